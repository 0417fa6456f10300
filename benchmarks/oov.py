"""Personal OOV adapters on Shakespeare by role: OOV rate and EMR@3, against no adapter and against
local fine-tuning of the whole model (issue 18).

    nice -n 10 .venv/bin/python benchmarks/oov.py                        # the tables in docs/oov.md
    nice -n 10 .venv/bin/python benchmarks/oov.py --rounds 2 --users 5   # smoke

1. Federated training of the closed-vocabulary word LM (task ``shakespeare-words``: top-V words of
   the federated training text, character-aware embeddings) with FedAvg rounds over the roles.
2. For a fixed seeded set of users (roles), on the device, from the final global model:
   - no adapter: the global model as it is;
   - OOV adapter: the user's K most frequent OOV words of their *training* text get embeddings
     from the character encoder plus a trainable bottleneck and bias; only those train (Adam);
   - local fine-tuning: the whole model trained on the user's training text (Adam), no new words.
   Each is scored on the user's held-out *test* text: EMR@3 (the true next word among the top 3
   predicted words; ``<unk>`` is never a prediction and never a match) over every position and over
   the positions whose target is outside the base vocabulary; and the OOV rate of the test text
   before (base vocabulary) and after (base + the user's K words).
3. The global model's flat vector is compared bit for bit before and after every adaptation:
   nothing personal is written into what would be uploaded.
Writes benchmarks/out/oov.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from flotilla.config import validate
from flotilla.experiment.run import build
from flotilla.oov.data import windows
from flotilla.oov.personal import adapt, finetune, personal_ids, score
from flotilla.oov.vocab import exact_match_at_k, oov_rate
from flotilla.tasks import build_task

OUT = Path(__file__).resolve().parent / "out" / "oov.json"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def train_federated(args):
    cfg = validate(
        {
            "seed": 0,
            "rounds": args.rounds,
            "cohort": args.cohort,
            "threads": 1,
            "task": {"name": "shakespeare-words", "vocab_size": args.vocab},
            "client": {"steps": args.client_steps, "batch_size": args.batch, "lr": args.lr, "momentum": args.momentum},
            "server": {"optimizer": args.server, "lr": args.server_lr},
            "eval": {"every": args.rounds, "max_clients": 40},
            "output": {"progress": False},
        }
    )
    task = build_task(cfg.task, cfg.seed)
    algorithm, rounds, evaluate_fn, _ = build(cfg, task)
    t0 = time.perf_counter()
    try:
        for r in range(rounds):
            metrics = algorithm.step()
            if (r + 1) % max(1, rounds // 5) == 0:
                print(f"  round {r + 1}: train loss {metrics.get('train_loss', float('nan')):.3f}", flush=True)
        record = evaluate_fn(algorithm.weights)
    finally:
        algorithm.close()
    algorithm.flat.load(algorithm.weights)
    print(f"federated: loss {record['loss']:.3f} top-1 acc {record['accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)")
    return task, algorithm.flat, record


def pooled(scores, attr, weight):
    total = sum(getattr(s, weight) for s in scores)
    return sum(getattr(s, attr) * getattr(s, weight) for s in scores if getattr(s, weight)) / max(total, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--cohort", type=int, default=5)
    p.add_argument("--client-steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--server", default="fedavg")
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--k", type=int, nargs="+", default=[10, 50], help="adapter words per user")
    p.add_argument("--device-steps", type=int, default=40)
    p.add_argument("--adapter-lr", type=float, default=1e-2)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    torch.set_num_threads(1)
    load_before = load()
    task, flat, fed = train_federated(args)
    data, base = task.dataset, task.model
    vocab, seq = data.vocab, data.seq_len
    uploaded = flat.flat.clone()
    known = set(vocab.words)
    rng = np.random.default_rng(0)
    users = sorted(rng.choice(data.num_clients, min(args.users, data.num_clients), replace=False).tolist())
    fit = dict(steps=args.device_steps, batch_size=args.batch, seed=0)
    per_user = []
    t0 = time.perf_counter()
    for u in users:
        role = data.roles[u]
        x, y = windows(vocab.ids(role.test), seq)
        row = {"user": role.name, "test_words": len(role.test), "oov_before": oov_rate(role.test, known)}
        row["train_oov_before"] = oov_rate(role.train, known)
        row["none"] = score(base, x, y, len(vocab)).__dict__
        row["finetune"] = score(
            finetune(base, vocab, role.train, seq, lr=args.finetune_lr, **fit), x, y, len(vocab)
        ).__dict__
        for k in args.k:
            personal = adapt(base, vocab, role.train, k, seq, lr=args.adapter_lr, **fit)
            words = set(personal.adapter.words)
            xp, yp = windows(personal_ids(role.test, vocab, personal.adapter.words), seq)
            row[f"adapter{k}"] = {**score(personal, xp, yp, len(vocab)).__dict__, "words": len(words)}
            with torch.no_grad():
                on_words = yp >= len(vocab)
                hits = exact_match_at_k(personal(xp), yp)[on_words]
            row[f"adapter{k}"].update(word_positions=int(on_words.sum()), word_hits=int(hits.sum()))
            # in-sample check that the adapter learned its words: EMR@3 at OOV positions of the training text
            xt, yt = windows(personal_ids(role.train, vocab, personal.adapter.words), seq)
            row[f"adapter{k}"]["train_emr_oov"] = score(personal, xt, yt, len(vocab)).emr_oov
            row[f"oov_after{k}"] = oov_rate(role.test, known | words)
            row[f"train_oov_after{k}"] = oov_rate(role.train, known | words)
        assert torch.equal(flat.flat, uploaded), "personalisation changed the federated model"
        per_user.append(row)
        print(
            f"  {role.name}: EMR@3 none {row['none']['emr']:.3f} finetune {row['finetune']['emr']:.3f} "
            + " ".join(f"adapter{k} {row[f'adapter{k}']['emr']:.3f}" for k in args.k)
            + f"; OOV {row['oov_before']:.3f} -> "
            + " / ".join(f"{row[f'oov_after{k}']:.3f}" for k in args.k),
            flush=True,
        )
    summary = {}
    for method in ["none", "finetune", *[f"adapter{k}" for k in args.k]]:
        emr = np.array([r[method]["emr"] for r in per_user])
        gain = emr - np.array([r["none"]["emr"] for r in per_user])
        oov_pos = [r[method] for r in per_user if r[method]["oov_positions"]]
        hits = sum(o["emr"] * o["positions"] for o in (r[method] for r in per_user))
        summary[method] = {
            "emr_pooled": hits / sum(r[method]["positions"] for r in per_user),
            "emr_user_mean": float(emr.mean()),
            "emr_oov_pooled": sum(o["emr_oov"] * o["oov_positions"] for o in oov_pos)
            / max(1, sum(o["oov_positions"] for o in oov_pos)),
            "gain_user_mean": float(gain.mean()),
            "gain_user_p10_p50_p90": [float(np.percentile(gain, q)) for q in (10, 50, 90)],
            "users_improved": int((gain > 0).sum()),
            "users_worse": int((gain < 0).sum()),
        }
        if method.startswith("adapter"):
            summary[method]["train_emr_oov_user_mean"] = float(
                np.nanmean([r[method]["train_emr_oov"] for r in per_user])
            )
            summary[method]["test_positions_on_adapter_words"] = sum(r[method]["word_positions"] for r in per_user)
            summary[method]["test_hits_on_adapter_words"] = sum(r[method]["word_hits"] for r in per_user)
    words = sum(r["test_words"] for r in per_user)
    for k in args.k:
        before = sum(r["oov_before"] * r["test_words"] for r in per_user) / words
        after = sum(r[f"oov_after{k}"] * r["test_words"] for r in per_user) / words
        summary[f"oov_rate_test_k{k}"] = {"before": before, "after": after, "cut": 1 - after / before}
        tb = float(np.mean([r["train_oov_before"] for r in per_user]))
        ta = float(np.mean([r[f"train_oov_after{k}"] for r in per_user]))
        summary[f"oov_rate_train_k{k}"] = {"before": tb, "after": ta, "cut": 1 - ta / tb}
    out = {
        "args": vars(args),
        "federated": {k: fed[k] for k in ("loss", "accuracy")},
        "clients": data.num_clients,
        "vocab": len(vocab),
        "users": len(users),
        "device_seconds": time.perf_counter() - t0,
        "flat_unchanged_after_personalisation": True,
        "summary": summary,
        "per_user": per_user,
        "load_before": load_before,
        "load_after": load(),
    }
    out["args"] = {**vars(args), "out": str(args.out)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"load {load_before} -> {out['load_after']}; wrote {args.out}")


if __name__ == "__main__":
    main()
