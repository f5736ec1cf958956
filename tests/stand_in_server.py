"""A stand-in for a server process, NOT SGLang: tests of process handling run it.

It takes `launch_server`-style arguments, reads `--port` and ignores the rest, prints a line,
and answers GET /health with 200. Environment knobs make it misbehave the ways a real server
can: STAND_IN_EXIT=CODE prints "stand-in failing" and exits with CODE before listening;
STAND_IN_MUTE=1 never listens; STAND_IN_CHILD=1 starts a child process that sleeps (to show a
stop reaches the whole process group) and writes its pid to STAND_IN_CHILD_PID_FILE. After its
first /health answer (the engine's start-up wait), STAND_IN_SLOW_HEALTH=SECONDS makes every
/health answer that late, as SGLang's one-token health generation can be, and
STAND_IN_HEALTH_FAILS=N makes the next N answers 503.
"""

import os
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Health(BaseHTTPRequestHandler):
    answered = 0  # /health requests so far

    def do_GET(self):
        if self.path != "/health":
            self.send_response(404)
            self.end_headers()
            return
        Health.answered += 1
        late = Health.answered > 1
        if late:
            time.sleep(float(os.environ.get("STAND_IN_SLOW_HEALTH", "0")))
        failing = late and Health.answered <= 1 + int(os.environ.get("STAND_IN_HEALTH_FAILS", "0"))
        self.send_response(503 if failing else 200)
        self.end_headers()

    def log_message(self, *args):
        pass


def main(argv: list[str]) -> None:
    port = int(argv[argv.index("--port") + 1])
    print(f"stand-in server (not SGLang) for {' '.join(argv)}", flush=True)
    if code := os.environ.get("STAND_IN_EXIT"):
        print("stand-in failing", flush=True)
        sys.exit(int(code))
    if os.environ.get("STAND_IN_CHILD"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(os.environ["STAND_IN_CHILD_PID_FILE"], "w") as f:
            f.write(str(child.pid))
    if os.environ.get("STAND_IN_MUTE"):
        time.sleep(600)
    ThreadingHTTPServer(("0.0.0.0", port), Health).serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
