"""The command line: `python -m trio_bg serve | drill | journal | worker`."""
