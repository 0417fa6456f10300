"""Device tiers coupled to the data, tier-aware system optimisations and RF^2's fairness measure
(issue 15; Maeng et al., RecSys 2022).  See docs/fairness.md.

    tiers.py     tier names, the random and dirichlet assignments
    items.py     what a client holds for the dirichlet assignment (labels, plays, clicks)
    speeds.py    tier speed multipliers from benchmarkme's real machines (terciles)
    config.py    the ``tiers:`` config section
    select.py    exclude the low tier / over-select and drop the slowest
    channel.py   per-tier quantisation and random pruning of updates (flotilla.channels)
    heterofl.py  narrower MLPs on slow tiers, per-parameter averaging over holders
    evaluate.py  per-tier test metrics; mdac.py: r_t and MDAC
    parts.py     what the experiment layer calls
"""
