"""Runners: a bench in this process (:class:`Local`) or in a subprocess (:class:`Worker`).

A subprocess has its own ``KERAS_BACKEND`` and thread pools, so one run can measure
several backends, and thread settings always apply (TensorFlow fixes them when it starts).
The subprocess is ``python -m keras_resnet.benchmark.worker`` (see :data:`MODULE`):

* with no arguments it is a worker: it reads JSON requests on stdin (``start`` with a
  spec, ``window``, ``quit``) and writes one JSON reply per request on stdout, each line
  prefixed with :data:`MARK` (anything a library prints goes to stderr instead);
* with ``measure JOB.json OUT.json`` it measures the one bench of ``JOB.json`` (``spec``,
  ``windows``, ``steps``) in its own process and writes ``{"results": [...]}`` to
  ``OUT.json``; the memory mode measures the peak RSS of such a process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

from keras_resnet.benchmark import benches, epochs, protocol, torch_twins
from keras_resnet.benchmark.errors import BenchmarkError
from keras_resnet.pipeline.errors import UserError, first_line

# The folder holding the keras_resnet package: subprocesses import it from there.
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
MARK = "@@benchmark "  # prefix of worker replies on stdout
MODULE = "keras_resnet.benchmark.worker"  # the subprocess entry point
BENCHES = {"keras": benches.KerasBench, "torch": torch_twins.TorchBench,
           "tflite": benches.TFLiteBench, "pipeline": benches.PipelineBench,
           "stream": benches.StreamBench, "keras_epochs": epochs.KerasEpochs,
           "torch_epochs": epochs.TorchEpochs}


def make_bench(spec: dict):
    """The bench of ``spec["kind"]`` (a key of :data:`BENCHES`)."""
    return BENCHES[spec["kind"]](spec)


def child_env(**overrides) -> dict:
    """This process's environment, with the package importable and TensorFlow's C++ log
    lines below warnings off (they would fill the quoted stderr)."""
    path = os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=path, **overrides)


def current_backend() -> str:
    """The Keras backend of this process (Keras loaded or not)."""
    keras = sys.modules.get("keras")
    if keras is not None:
        return keras.config.backend()
    return os.environ.get("KERAS_BACKEND", "tensorflow")


class Local:
    """Runs a bench in this process."""

    def __init__(self, spec):
        self.spec = spec
        self.bench = None

    def start(self):
        self.bench = make_bench(self.spec)
        return {"info": self.bench.info,
                "warm": protocol.warm(self.bench, self.spec["tasks"], self.spec["warmup"])}

    def window(self, task, steps):
        return protocol.window(self.bench, task, steps)

    def close(self):
        self.bench = None


class Worker:
    """Runs a bench in a subprocess with its own KERAS_BACKEND, answering one request a time.

    Requests and replies are JSON lines (replies prefixed with :data:`MARK` on stdout); the
    worker's stderr goes to a temporary file quoted when it fails.
    """

    def __init__(self, spec, timeout):
        self.spec = spec
        self.timeout = timeout
        self.proc = None
        self.stderr = None

    def start(self):
        env = child_env(KERAS_BACKEND=self.spec.get("backend") or "tensorflow")
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", MODULE], cwd=PACKAGE_ROOT,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, bufsize=1)
        return self._ask({"cmd": "start", "spec": self.spec})

    def _ask(self, request):
        timer = threading.Timer(self.timeout, self.proc.kill)
        timer.start()
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            while True:
                line = self.proc.stdout.readline()
                if not line:
                    raise BenchmarkError(f"the {self.spec['name']} subprocess ended without "
                                         f"an answer ({self._stderr_tail()})")
                if line.startswith(MARK):
                    reply = json.loads(line[len(MARK):])
                    break
        except (BrokenPipeError, OSError) as e:
            raise BenchmarkError(f"the {self.spec['name']} subprocess failed "
                                 f"({self._stderr_tail() or e})") from None
        finally:
            timer.cancel()
        if "error" in reply:
            if reply.get("user"):
                raise BenchmarkError(reply["error"])
            raise RuntimeError(f"{self.spec['name']}: {reply['error']}")
        return reply

    def _stderr_tail(self):
        self.stderr.seek(0)
        lines = [ln for ln in self.stderr.read().splitlines() if ln.strip()]
        return lines[-1].strip() if lines else "no message"

    def window(self, task, steps):
        return self._ask({"cmd": "window", "task": task, "steps": steps})

    def close(self):
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            self.stderr.close()
            self.proc = None


def make_runner(spec: dict, *, timeout: float, subprocess_only: bool = False):
    """A Local runner when this process can hold the bench, else a Worker.

    PyTorch twins and Keras models on another backend than this process's always run in
    a subprocess.
    """
    local = (not subprocess_only and spec["kind"] != "torch"
             and (spec["kind"] != "keras" or spec["backend"] == current_backend()))
    return Local(spec) if local else Worker(spec, timeout)


def measure_command(job_file: str, out_file: str) -> list[str]:
    """The command that measures one bench in a fresh process (see the module docstring)."""
    return [sys.executable, "-m", MODULE, "measure", job_file, out_file]


def worker_main() -> int:
    """The subprocess side of Worker: reads requests on stdin, replies on stdout."""
    reply_to = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the replies
    bench = None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["cmd"] == "start":
                spec = request["spec"]
                bench = make_bench(spec)
                reply = {"info": bench.info,
                         "warm": protocol.warm(bench, spec["tasks"], spec["warmup"])}
            elif request["cmd"] == "window":
                reply = protocol.window(bench, request["task"], request["steps"])
            else:
                reply_to.write(MARK + json.dumps({"ok": True}) + "\n")
                break
        except UserError as e:
            reply = {"error": str(e), "user": True}
        except Exception as e:  # noqa: BLE001 - reported to the parent, traceback on stderr
            traceback.print_exc()
            reply = {"error": f"{type(e).__name__}: {first_line(e)}", "user": False}
        reply_to.write(MARK + json.dumps(reply) + "\n")
    return 0


def measure_main(job_file: str, out_file: str) -> int:
    """Measures the bench of ``job_file`` here; exit status 2 for a UserError."""
    with open(job_file) as f:
        job = json.load(f)
    try:
        results = protocol.measure([(Local(job["spec"]), t) for t in job["spec"]["tasks"]],
                                   windows=job["windows"], steps=job["steps"])
    except UserError as e:
        print(f"error: {first_line(e)}", file=sys.stderr, flush=True)
        return 2
    with open(out_file, "w") as f:
        json.dump({"results": results}, f, indent=1, default=str)
    return 0
