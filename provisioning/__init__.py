"""Idempotent node steps shared by every target, weight fetching, and the on-prem installer.

May import `runtime`; never `infra`.
"""
