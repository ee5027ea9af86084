"""mcmc: Cox's estimate mean(L) + s^2/2 exceeds the volume of the r_max ball (the most
the basin within r_max can hold) when replicates disagree; the interval too."""
import torch

from minefield.bodies import Box, log_ball_volume
from minefield.cooling import cooling_volume

torch.set_num_threads(1)
n = 10
body = Box(torch.logspace(-1, 0, n, dtype=torch.float64))
ball = log_ball_volume(n, 1.0)  # vol of {|x| < r_max = 1}: nothing within r_max is larger
e = cooling_volume(body, n, body.cutoff, n_chains=4, n_replicates=2, r_max=1.0,
                   walk_length=1, generator=torch.Generator().manual_seed(0))
print(f"truth {body.log_volume:.2f}  r_max ball {ball:.2f}  estimate {e.log_volume:.2f}  "
      f"ci [{e.ci[0]:.2f}, {e.ci[1]:.2f}]  replicates {e.details['replicates']}")
print("BUG: estimate above the r_max ball" if e.log_volume > ball else "ok: capped",
      "| BUG: interval above it" if e.ci[1] > ball + n * 1e-6 else "")
