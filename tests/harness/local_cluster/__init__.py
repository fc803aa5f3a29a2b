"""`hack/cluster.sh`: a local cluster on this machine that outlives the command (cluster.py: its pieces; __main__.py:
the command and the supervisor process that holds them)."""
