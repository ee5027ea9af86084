"""VolumeConfig accepts grid_power <= 0 and NaN (and a NaN bracket_ratio): the grid
t = r_max u^p is then no scan of [0, r_max] and the radii are silently wrong, or a raw
ValueError about NaN radii comes out. Oracle: QuadraticNet, an exact 3-d ellipsoid."""
import math
import warnings

import torch

from minefield.basin import VolumeConfig, basin_radii
from minefield.bodies import QuadraticNet
from minefield.directions import DirectionSpec

torch.set_num_threads(1)
warnings.simplefilter("ignore")
net = QuadraticNet(torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)))
params = {k: v.detach()[None] for k, v in net.named_parameters()}
print(f"truth log10 V {net.body().log_volume / math.log(10):.3f}")
for kw in [dict(method="grid"), dict(method="grid", grid_power=-1.0),
           dict(method="grid", grid_power=0.0), dict(method="grid", grid_power=math.nan),
           dict(bracket_ratio=math.nan)]:
    try:
        cfg = VolumeConfig(cutoff=QuadraticNet.cutoff, r_max=3.0, n_directions=50,
                           directions=DirectionSpec("gaussian", "exclude", 0), **kw)
        res = basin_radii(net, params, QuadraticNet.data(), cfg)
        print(kw, f"log10 V {res.log10_volume:.3f}, mean radius {res.mean_radius:.4f}")
    except Exception as e:  # noqa: BLE001
        print(kw, f"{type(e).__name__}: {e}")
