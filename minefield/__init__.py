"""minefield: why neural networks generalise, through the geometry of their minima.

A PyTorch toolkit reproducing and extending Huang et al., "Understanding
Generalization through Visualizations" (2019): poisoned ("bad") minima, searches
for bad minima along SGD trajectories, basin radius and volume by batched
Monte Carlo, loss-landscape slices, t-SNE maps of weight space.

Everything the ``minefield`` command does is one call here. A scripted
basin-volume study::

    import minefield as mf
    good = mf.train_run(mf.ExperimentConfig(name="good", data=mf.DataConfig("swissroll"),
                                            train=mf.TrainConfig(steps=5000)))
    basin = mf.basin_radii(good.model, good.params, good.data,
                           mf.VolumeConfig(n_directions=1000, cutoff=1.0))
    print(basin.mean_radius, basin.log10_volume)
"""

from .basin import BasinResult, Rollouts, VolumeConfig, basin_members, basin_radii, rollouts
from .bodies import Box, Ellipsoid, LpBall, QuadraticNet
from .config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    Optimizer,
    PoisonConfig,
    PoisonObjective,
    TrainConfig,
    load_config,
)
from .connectivity import (
    ConnectConfig,
    ConnectResult,
    bezier,
    connect,
    evaluate_curves,
    fit_curves,
    pair_seed,
)
from .cooling import cooling_volume
from .cooling_blocks import CoolingCost, block_replicates, cooling_block, cooling_cost, merge_blocks
from .curvature import (
    Eigen,
    SpectralDensity,
    TraceEstimate,
    dense_hessian,
    hessian_diagonal,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    spectral_density,
    top_eigenvalues,
)
from .data import DATASETS, Dataset, load_dataset
from .directions import DirectionSpec, n_perturbed, orthogonalize, random_directions
from .embed import EmbedConfig, EmbedResult, TSNEMap, embed_points, fit_map
from .engine import evaluate_points, evaluate_points_loop
from .evaluate import evaluate_members, resolve_device
from .executor import (
    Executor,
    ExecutorKind,
    LocalExecutor,
    RayExecutor,
    TaskFailed,
    TaskStore,
    make_executor,
    run_tasks,
    task_seed,
    torch_threads,
)
from .functional import stacked_forward
from .hvp import CurvatureKind, CurvatureOperator, NonFiniteLoss, Objective, model_objective
from .landscape import LandscapeConfig, Slice, Surface, axis, plane_directions, slice_1d, surface
from .lock import RunLocked
from .loss import accuracy, complement_nll, nll, poisoned_nll
from .measures import MEASURES, SharpnessConfig, measure_members
from .models import MODELS, build_model, init_params
from .netvolume import (
    CoolingBlocks,
    NetworkLines,
    basin_volume,
    cooling_blocks,
    merge_cooling_blocks,
)
from .optim import StackedOptimizer
from .precondition import Preconditioner, floor_curvature
from .ranking import cmi_score, granulated_tau, kendall_tau, score_measures
from .reproduce import SCALES, reproduce
from .runs import Run, RunError
from .sam import sam_perturbation, sam_update
from .search import SearchConfig, search_minima
from .sharpness import (
    SharpnessEstimate,
    average_sharpness,
    m_sharpness,
    pac_bayes_sigma,
    worst_case_sharpness,
)
from .stacked import Stacked, check_single, flatten, member, one, stack, unflatten
from .stages import (
    BasinRun,
    basin_run,
    connect_run,
    embed_run,
    landscape_run,
    load_basin,
    load_connect,
    load_embedding,
    load_landscape,
    load_map,
    load_run_model,
    load_sweep,
    search_run,
    sweep_run,
    train_run,
)
from .stages.study import StudyResult, load_study, run_stack, run_stacks, study_run
from .study import STACKABLE, StackSpec, StudyConfig, plan_study
from .sweep import SweepConfig, SweepResult, log_spaced_betas
from .train import fit
from .volume import (
    Estimator,
    VolumeEstimate,
    fit_power,
    honest_interval,
    log_chi_cdf,
    star_volume,
    weights_estimate,
)

__version__ = "0.1.0"

__all__ = [
    # configs
    "DataConfig", "ModelConfig", "PoisonConfig", "TrainConfig", "ExperimentConfig",
    "Optimizer", "PoisonObjective", "load_config",
    # data and models
    "Dataset", "DATASETS", "load_dataset", "MODELS", "build_model", "init_params",
    # the poisoned objective
    "poisoned_nll", "nll", "complement_nll", "accuracy",
    # stacked weights and training
    "Stacked", "stack", "member", "one", "check_single", "flatten", "unflatten",
    "stacked_forward", "fit",
    "StackedOptimizer", "sam_update", "sam_perturbation",
    "evaluate_members", "resolve_device", "Run",
    # directions, batched evaluation, basins
    "DirectionSpec", "random_directions", "n_perturbed", "orthogonalize",
    "evaluate_points", "evaluate_points_loop",
    "VolumeConfig", "BasinResult", "basin_radii", "basin_members", "Rollouts", "rollouts",
    # volume estimators with measured error, and the bodies they are measured on
    "Estimator", "VolumeEstimate", "star_volume", "fit_power", "cooling_volume", "log_chi_cdf",
    "weights_estimate", "honest_interval",
    "cooling_block", "merge_blocks", "block_replicates", "CoolingBlocks", "cooling_blocks",
    "merge_cooling_blocks", "cooling_cost", "CoolingCost",
    "Preconditioner", "floor_curvature", "NetworkLines", "basin_volume",
    "Ellipsoid", "Box", "LpBall", "QuadraticNet",
    # curvature and sharpness
    "Objective", "model_objective", "CurvatureOperator", "CurvatureKind", "NonFiniteLoss",
    "top_eigenvalues", "Eigen", "hutchinson_trace", "hutchpp_trace", "TraceEstimate",
    "hutchinson_diagonal", "hessian_diagonal", "dense_hessian", "spectral_density",
    "SpectralDensity", "worst_case_sharpness", "average_sharpness", "m_sharpness",
    "pac_bayes_sigma", "SharpnessEstimate", "SharpnessConfig", "MEASURES", "measure_members",
    # landscapes
    "LandscapeConfig", "Slice", "Surface", "axis", "slice_1d", "plane_directions", "surface",
    # the minefield
    "SearchConfig", "search_minima",
    "EmbedConfig", "EmbedResult", "TSNEMap", "embed_points", "fit_map",
    # mode connectivity: line and Bezier curve between minima
    "ConnectConfig", "ConnectResult", "connect", "bezier", "fit_curves", "evaluate_curves",
    "pair_seed",
    # poison-factor studies and the reproduction
    "SweepConfig", "SweepResult", "log_spaced_betas", "reproduce", "SCALES",
    # studies: a grid of configs -> stacks -> a tidy table -> every measure scored
    "StudyConfig", "StackSpec", "STACKABLE", "plan_study", "study_run", "run_stack",
    "run_stacks", "load_study", "StudyResult",
    "kendall_tau", "granulated_tau", "cmi_score", "score_measures",
    # the results layer: one function per stage, files and resume rule included
    "train_run", "search_run", "embed_run", "basin_run", "landscape_run", "sweep_run",
    "load_run_model", "load_embedding", "load_map", "load_basin", "load_landscape", "load_sweep",
    "connect_run", "load_connect",
    "BasinRun",
    # running the tasks of a stage here or on a Ray cluster
    "Executor", "ExecutorKind", "make_executor", "LocalExecutor", "RayExecutor", "run_tasks",
    "TaskStore", "task_seed", "TaskFailed", "torch_threads",
    # errors: a config that cannot be used, a missing or corrupt run, a run another writes
    "ConfigError", "RunError", "RunLocked",
]
