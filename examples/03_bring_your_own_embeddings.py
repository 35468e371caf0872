"""Example 3: the weak-to-strong pipeline on your own embeddings.

What you bring: two representations of the same n samples (row i of each is sample i), saved from a weak and
a strong model, and integer labels 0..k-1. Here they are made from scikit-learn's bundled handwritten digits
so that the script runs anywhere without a download: the "strong model" sees a 16-number summary of each
image, the "weak model" a noisy 3-number one. Replace the two arrays with yours.

`w2s-theory study` then fits a weak teacher on a third of the rows, its soft labels on the second third
train strong students under forward/reverse KL and CE, and the last third scores them: accuracy, KL error,
gain over the teacher, misfit, PGR, and the guarantee check (docs/theory.md). The same call from Python is
`w2s_theory.byo.run_byo(weak, strong, labels, ByoSettings(repeats=3))`.
Run: python examples/03_bring_your_own_embeddings.py  (about 20 s on a 2-core CPU).
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

images, labels = load_digits(return_X_y=True)  # 1797 images of 8x8 pixels, 10 classes
rng = np.random.default_rng(0)
strong = images.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(-1, 16)  # a 4x4 thumbnail
weak = images @ rng.standard_normal((64, 3)) / 8 + rng.standard_normal((len(images), 3))  # 3 noisy numbers

folder = Path(tempfile.mkdtemp())
for name, array in (("weak", weak), ("strong", strong), ("labels", labels)):
    np.save(folder / f"{name}.npy", array)  # your own arrays go here, one row per sample

command = ["w2s-theory", "study", "--weak-features", str(folder / "weak.npy"),
           "--strong-features", str(folder / "strong.npy"), "--labels", str(folder / "labels.npy"),
           "--repeats", "3", "--json", str(folder / "report.json")]
print("$", " ".join(c if "/" not in c else Path(c).name for c in command))
subprocess.run(command, check=True)  # prints the report table

report = json.loads((folder / "report.json").read_text())
losses = [name for name in report if name not in ("weak", "ceiling", "settings")]  # one entry per loss
best = max(losses, key=lambda loss: report[loss]["accuracy"])
print(f"best student: {best}, test accuracy {report[best]['accuracy']:.3f} ± {report[best]['accuracy_se']:.3f} "
      f"(weak teacher {report['weak']['accuracy']:.3f}, strong ceiling {report['ceiling']['accuracy']:.3f})")
