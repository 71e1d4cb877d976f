"""The Pulumi project and cloud preflight. The front door (`herd`) lives here, at the top of the
import flow: infra -> provisioning -> runtime. Cloud SDKs are imported lazily, only by cloud commands.
"""
