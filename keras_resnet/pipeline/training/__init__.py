"""The training stage: :func:`keras_resnet.pipeline.train` and what it is built from.

    loop              train(): build, compile and fit inside the strategy, resume
    network           the run's model as it trains and as it is saved
    optimization      schedules, optimizers, weight decay, the weight average
    callbacks         per-epoch bookkeeping: NaN guard, checkpoints, progress, curves
    distribute        the tf.distribute strategy (or one device on another backend)
    precision         the dtype policy and what the CPU supports
    fused_batch_norm  TensorFlow's fused BatchNormalization kernel for training
    machine           the backend's GPUs, library versions, seeding
"""
