"""Write points.csv: the local data file the example task reads (run once; the file is small).

Each row is one user's labelled 2-D point: `user,x,y,label`.  Users draw their points around
their own centre (their data differ), which is what makes the task federated.
"""

import csv
from pathlib import Path

import numpy as np


def main(
    path: Path = Path(__file__).with_name("points.csv"), users: int = 40, per_user: int = 30, seed: int = 0
) -> Path:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 2.0, size=(users, 2))
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user", "x", "y", "label"])
        for u in range(users):
            pts = centres[u] + rng.normal(0.0, 1.0, size=(per_user, 2))
            labels = (pts[:, 0] * pts[:, 1] > 0).astype(int)  # XOR-like quadrants: needs a hidden layer
            for (x, y), lab in zip(pts, labels):
                w.writerow([f"user{u}", f"{x:.4f}", f"{y:.4f}", int(lab)])
    return path


if __name__ == "__main__":
    print(main())
