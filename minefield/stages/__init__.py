"""The results layer: one function per stage, each owning its files and its resume rule.

Every stage takes a run (or a config), writes its results into the run
directory through :mod:`minefield.runs`, and obeys one rule
(:meth:`~minefield.runs.Run.resume`): results are keyed by the stage config
that made them; the same config reuses (or resumes) them, a different one
refuses without ``force``. The CLI and :mod:`minefield.reproduce` only call
these.

====================  =============================  ==============================
stage                 writes                          key
====================  =============================  ==============================
:func:`train_run`     ``config.json``, trajectory     the experiment config
:func:`search_run`    ``search/``                     the search config
:func:`embed_run`     ``embed/`` (points, map)        the embed config
:func:`basin_run`     ``basin/<tag>.json``            volume config, checkpoint
:func:`landscape_run` ``landscape/<tag>.safetensors`` the landscape config
:func:`sweep_run`     a run + ``sweep.json``          experiment + sweep config
:func:`connect_run`   ``connect/<tag>.json``          connect config, endpoints
:func:`run_stack`     a run + ``models.json``         volume, measures, steps, members
:func:`study_run`     ``stacks/``, ``study.json``      base config + study config
====================  =============================  ==============================
"""

from .basin import BasinRun, basin_run, load_basin
from .connect import ConnectRun, connect_run, load_connect
from .embed import embed_run, load_embedding, load_map
from .landscape import landscape_run, load_landscape
from .search import SearchSummary, search_run, select_checkpoints
from .study import load_study, run_stack, run_stacks, study_run
from .sweep import load_sweep, sweep_run
from .train import TrainResult, load_run_model, match_model, train_run

__all__ = ["train_run", "TrainResult", "load_run_model", "match_model",
           "search_run", "SearchSummary", "select_checkpoints",
           "embed_run", "load_embedding", "load_map", "basin_run", "BasinRun", "load_basin",
           "landscape_run", "load_landscape", "sweep_run", "load_sweep",
           "connect_run", "load_connect", "ConnectRun",
           "study_run", "run_stack", "run_stacks", "load_study"]
