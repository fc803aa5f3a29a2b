"""The multi-NUMA qemu guest: vm.py boots it and drives it from the host, relay.py carries its connections to the
host's loopback (a host process qemu starts), and inside/ is what runs in the guest."""
