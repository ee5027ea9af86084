"""VolumeConfig(n_bootstrap=0): the honest bound (known without any bootstrap) came
out as (nan, nan) when the weights are heavy-tailed, with no word said."""
import math
import warnings

import torch

from minefield.basin import VolumeConfig, basin_radii
from minefield.bodies import QuadraticNet
from minefield.directions import DirectionSpec

torch.set_num_threads(1)
warnings.simplefilter("ignore")
net = QuadraticNet(torch.diag(torch.logspace(0, 4, 40, dtype=torch.float64)))
params = {k: v.detach()[None] for k, v in net.named_parameters()}
for nb in (1000, 0):
    res = basin_radii(net, params, QuadraticNet.data(), VolumeConfig(
        cutoff=QuadraticNet.cutoff, r_max=3.0, n_directions=20, n_bootstrap=nb,
        directions=DirectionSpec("gaussian", "exclude", 0)))
    print(f"n_bootstrap {nb}: log10 V {res.log10_volume:.3f} "
          f"{res.diagnostics['interval']} interval {res.ci_log10_volume}")
print(f"truth {net.body().log_volume / math.log(10):.3f}")
