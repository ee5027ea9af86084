"""rollouts() with filter directions on a model whose filters are exactly 0
(QuadraticNet at its minimum): every direction is 0, so the 'loss along random
directions' is flat at the centre's loss, silently; basin_radii refuses the same input."""
import torch

from minefield.basin import VolumeConfig, basin_radii, rollouts
from minefield.bodies import QuadraticNet
from minefield.directions import DirectionSpec

torch.set_num_threads(1)
net = QuadraticNet(torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)))
params = {k: v.detach()[None] for k, v in net.named_parameters()}
try:
    ro = rollouts(net, params, QuadraticNet.data(), 3, spec=DirectionSpec("filter"))
    print("rollouts: loss spread along every direction", float(ro.loss.max() - ro.loss.min()))
except Exception as e:  # noqa: BLE001
    print(f"rollouts: {type(e).__name__}: {e}")
try:
    basin_radii(net, params, QuadraticNet.data(), VolumeConfig(
        directions=DirectionSpec("filter"), cutoff=QuadraticNet.cutoff))
except Exception as e:  # noqa: BLE001
    print(f"basin_radii: {type(e).__name__}: {e}")
