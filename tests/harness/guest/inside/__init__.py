"""What runs inside the guest, with the guest's own python3: the agent (the guest's init starts it) and the modules
it loads for its "call" op. Standard library only (plus grpc, from the host's .venv on the guest's PYTHONPATH); the
agent loads them by file path, and the host never imports them."""
