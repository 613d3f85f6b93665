"""Studies: a study file's spec, the plan of its runs, running them, and using finished runs.

    spec        the study file: YAML with line numbers, Study / Strategy / EvalSet, validation
    overrides   `KEY.PATH=VALUE` command-line changes to a study file
    plan        the run matrix (strategy x seed), run configs and hashes, skip/ingest/resume/train
    generation  generation prompts, decoding and scores of eval sets with `generate:`
    runner      run_study, and default_run_fn (one run through training.loop.train)
    runs        a finished run: its record, model, merged export, samples, re-evaluation
"""

from loralab.study.generation import (
    decode_config,
    generate_hypotheses,
    generation_prompts,
    generation_scores,
)
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
from loralab.study.runner import build_task_data, default_run_fn, run_study
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

__all__ = [
    "EvalSet", "RunSpec", "Strategy", "Study", "build_task_data", "bundled_studies",
    "check_configs", "config_hash", "decode_config", "default_run_fn", "describe_run",
    "evaluate_saved", "generate_from_run", "generate_hypotheses", "generation_prompts",
    "generation_scores", "load_run", "load_run_model", "load_study", "merge_run",
    "parse_study", "pin_precision", "plan", "resolve_study_path", "run_config", "run_matrix",
    "run_study", "study_summary", "to_train_config", "with_seeds",
]
