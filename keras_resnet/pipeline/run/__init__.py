"""The run stage: what one run is and the folder it lives in.

    config        TrainConfig, the recipes, resolve() -> ResolvedConfig, the network a
                  run's config describes
    layout        the run folder's file names, which folder a run may use, which run a
                  folder holds
    lock          one process at a time writes a run folder
    checkpoints   checkpoints, resuming from the newest intact one, what a resume must match
    reader        reading a finished run (its config, labels and model)
    lineage       what each model file was made from, and whether it is current
    safe_writes   writes that are never seen half done; one error for a full disk
    formats       whether a model file is what its name says
    preemption    SIGTERM/SIGINT as a stop request or an immediate stop

Nothing here imports TensorFlow.
"""
