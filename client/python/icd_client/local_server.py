"""Runs an icd-server on loopback for scripts, examples and tests.

    with LocalServer("build/server/icd-server", model_roots=[m], export_roots=[e]) as srv:
        client = Client(srv.address)
        ...
    # srv.exit_code: what the server returned after SIGTERM (0 on a clean stop)
    # srv.metrics_address: HOST:PORT of /metrics, with extra_args
    #   ["--metrics-listen", "127.0.0.1:0"]

The server picks a free port (--listen 127.0.0.1:0) and prints
"listening on HOST:PORT"; readiness is that line, never a sleep.
"""

import os
import select
import signal
import subprocess
import tempfile
import threading
import time

import numpy as np

__all__ = ["LocalServer", "rel_l2"]


def rel_l2(a, b):
    """||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _read_line(fd, timeout_s):
    """One line from a pipe, waiting at most timeout_s."""
    line = b""
    deadline = time.monotonic() + timeout_s
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
    return line.decode().strip()


class LocalServer:
    """icd-server as a child process; stderr (one log line per call) goes to a file."""

    def __init__(self, binary, model_roots=(), export_roots=(), extra_args=(),
                 start_timeout_s=120):
        self.log_path = tempfile.mkstemp(prefix="icd-server-", suffix=".log")[1]
        self._log = open(self.log_path, "w+")
        args = [binary, "--listen", "127.0.0.1:0"]
        for root in model_roots:
            args += ["--model-root", root]
        for root in export_roots:
            args += ["--export-root", root]
        self.proc = subprocess.Popen(args + list(extra_args), stdout=subprocess.PIPE,
                                     stderr=self._log)
        self.exit_code = None
        self.address = self._announced("listening on ", start_timeout_s)
        self.port = int(self.address.rsplit(":", 1)[1])
        # With --metrics-listen the server says where on the next line.
        self.metrics_address = None
        if "--metrics-listen" in extra_args:
            self.metrics_address = self._announced("metrics on ", start_timeout_s)
        # Keep draining stdout so the server never blocks on a full pipe.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def _announced(self, prefix, timeout_s):
        """The HOST:PORT of the server's next stdout line, which must start
        with `prefix`; else the server is killed and its log raised."""
        line = _read_line(self.proc.stdout.fileno(), timeout_s)
        if not line.startswith(prefix):
            self.kill()
            raise RuntimeError("icd-server said %r instead of '%s...'; log:\n%s"
                               % (line, prefix, self.log()))
        return line[len(prefix):]

    def log(self, tail=4000):
        self._log.flush()
        self._log.seek(0)
        return self._log.read()[-tail:]

    def stop(self, timeout_s=60):
        """SIGTERM, wait for the graceful shutdown; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("icd-server still running %d s after SIGTERM" % timeout_s)
        return self.exit_code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.exit_code = self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.stop()
        self._log.close()
        return False
