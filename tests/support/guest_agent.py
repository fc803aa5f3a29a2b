"""Where the test guest's init looks for its command agent: hack/testenv/guest/init, baked into the guest's image by
hack/testenv/guest.sh, runs `python3 <checkout>/tests/support/guest_agent.py PORT`. The agent is
tests/harness/guest/inside/agent.py; this file only runs it, so that guests built before the harness moved keep
working without a rebuild. Remove it when hack/testenv/guest/init changes (the guest is rebuilt then anyway): point
the init at the agent itself."""

import os
import runpy

runpy.run_path(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "harness", "guest", "inside", "agent.py"),
    run_name="__main__",
)
