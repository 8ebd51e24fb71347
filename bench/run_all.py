"""`make bench`: run every benchmark in bench/ one after the other (each appends its ratios to bench/RESULTS.md).

Not run by CI: timings need a quiet machine. Each script measures its alternatives side by side in one process.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
for script in ("bench_model.py", "bench_kmeans.py", "bench_train.py", "bench_cluster_vs_epoch.py", "bench_jobs.py"):
    print(f"== bench/{script}", flush=True)
    subprocess.run([sys.executable, os.path.join(HERE, script)], cwd=os.path.dirname(HERE), check=True)
