"""What the bench scripts share: one `prefpipe run` of a pipeline in a fresh
store with a given number of threads, its stages' run.json records and peak
RSS, and SQL over its tables (`prefpipe query`)."""
import json
import os
import subprocess
import sys


class Run:
    """Runs `yaml_text` (written to work/bench.yaml) with RAYON_NUM_THREADS=threads;
    exits with prefpipe's stderr when the run fails."""

    def __init__(self, binary, work, yaml_text, threads):
        self.binary, self.work = binary, work
        with open(os.path.join(work, "bench.yaml"), "w") as f:
            f.write(yaml_text)
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
        self.store = os.path.join(work, "store")
        p = subprocess.Popen([binary, "run", "bench.yaml", "--store", self.store], cwd=work, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, ru = os.wait4(p.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(p.stderr.read().decode())
        self.maxrss_mib = ru.ru_maxrss / 1024
        with open(os.path.join(self.store, "run.json")) as f:
            self.stages = {s["id"]: s for s in json.load(f)["stages"]}

    def query(self, sql):
        """The result rows of `sql` as lists of strings (CSV, header dropped)."""
        q = subprocess.run([self.binary, "query", sql, "--pipeline", "bench.yaml", "--store", self.store,
                            "--format", "csv"], cwd=self.work, capture_output=True, text=True, check=True)
        return [line.split(",") for line in q.stdout.splitlines()[1:]]
