"""Pulumi's entry point (`pulumi up` in infra/ runs this file)."""
from infra.program import main

main()
