"""All figures: ``plot_*(result, ..., ax=None) -> Axes``, one shared style (see ``style``)."""

from .boundary import boundary_grid, plot_boundary
from .style import save_figure

__all__ = ["plot_boundary", "boundary_grid", "save_figure"]
