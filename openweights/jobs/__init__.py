"""Built-in job kinds. Each is a folder: `params.py` / `__init__.py` (client side, no GPU imports)
and `entry.py` (worker side, run as `python -m openweights.jobs.<kind>.entry`)."""
