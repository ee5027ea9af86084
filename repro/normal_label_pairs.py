"""A "normal" 95% interval from 20 direction pairs: the ESS gate (>= 20, >= half the draws)
counts the two radii of a pair (the same draw) twice, so 10 pairs' worth passes it.
Over 300 seeds on a 5-d ellipsoid (semi-axes log-spaced over half a decade), count how
often the intervals labelled normal cover the truth: the paper's path (basin's
volume_from_radii, percentile bootstrap) and star_volume (Hall's interval)."""
import math

import torch

from minefield.basin import volume_from_radii
from minefield.bodies import Ellipsoid, log_spaced_axes
from minefield.volume import _directions, ray_radii, star_volume

torch.set_num_threads(1)
n, pairs, seeds = 5, 20, 300
body = Ellipsoid(log_spaced_axes(n, 0.5))
truth = body.log_volume
lab = boot = hall = 0
for s in range(seeds):
    u, _ = _directions(n, pairs, torch.Generator().manual_seed(s), None)
    r, _ = ray_radii(body, u, body.cutoff, 10.0, 1e-9)
    res = volume_from_radii(r, n, 0.0, body.cutoff, config={"rtol": 1e-9}, seed=s, r_max=10.0)
    e = star_volume(body, n, body.cutoff, "naive", pairs, torch.Generator().manual_seed(s),
                    r_max=10.0, rtol=1e-9)
    if res.diagnostics["interval"] == "normal":
        lo, hi = res.ci_log10_volume
        lab += 1
        boot += lo <= truth / math.log(10) <= hi
        hall += e.ci[0] <= truth <= e.ci[1]
print(f"{lab} of {seeds} labelled normal; of those the reported (bootstrap) interval covers "
      f"{boot} ({boot / max(lab, 1):.0%}), star_volume's Hall interval {hall} "
      f"({hall / max(lab, 1):.0%}); stated 95%")
