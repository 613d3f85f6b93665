"""Studies: a study file's spec, the plan of its runs, running them, and using finished runs.

    spec        the study file: YAML with line numbers, Study / Strategy / EvalSet, validation
    overrides   `KEY.PATH=VALUE` command-line changes to a study file
    plan        the run matrix (strategy x seed), run configs and hashes, skip/ingest/resume/train
    generation  generation prompts, decoding and scores of eval sets with `generate:`
    leases      claiming runs under leases (any number of processes share a study), heartbeats
    runner      run_study (the claim loop), and default_run_fn (one run through train)
    workers     `compare --jobs N`: worker processes, one device each, and the study display
    runs        a finished run: its record, model, merged export, samples, re-evaluation
"""

from loralab.study.generation import (
    decode_config,
    generate_hypotheses,
    generation_prompts,
    generation_scores,
)
from loralab.study.leases import Heartbeat, claim_next, claim_run, open_runs
from loralab.study.plan import (
    RunSpec,
    check_configs,
    config_hash,
    describe_run,
    pin_precision,
    plan,
    run_config,
    run_matrix,
    to_train_config,
)
from loralab.study.runner import (
    build_task_data,
    default_run_fn,
    prepare_run_dir,
    record_outcome,
    run_study,
)
from loralab.study.runs import (
    evaluate_saved,
    generate_from_run,
    load_run,
    load_run_model,
    merge_run,
)
from loralab.study.spec import (
    EvalSet,
    Strategy,
    Study,
    bundled_studies,
    load_study,
    parse_study,
    resolve_study_path,
    study_summary,
    with_seeds,
)
from loralab.study.workers import WorkerDevice, run_jobs, worker_devices

__all__ = [
    "EvalSet", "Heartbeat", "RunSpec", "Strategy", "Study", "WorkerDevice", "build_task_data",
    "bundled_studies", "check_configs", "claim_next", "claim_run", "config_hash",
    "decode_config", "default_run_fn", "describe_run", "evaluate_saved", "generate_from_run",
    "generate_hypotheses", "generation_prompts",
    "generation_scores", "load_run", "load_run_model", "load_study", "merge_run",
    "open_runs", "parse_study", "pin_precision", "plan", "prepare_run_dir", "record_outcome",
    "resolve_study_path", "run_config", "run_jobs", "run_matrix", "run_study", "study_summary",
    "to_train_config", "with_seeds", "worker_devices",
]
