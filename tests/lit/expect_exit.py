"""lit helper: `expect-exit N CMD...` runs CMD and succeeds only if it exits with code N."""
import subprocess
import sys

want, cmd = int(sys.argv[1]), sys.argv[2:]
rc = subprocess.call(cmd)
if rc != want:
    print(f"expect-exit: {' '.join(cmd)} exited with {rc}, expected {want}", file=sys.stderr)
sys.exit(0 if rc == want else 1)
