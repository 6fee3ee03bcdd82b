"""The Ray layer: the only package in dist_sae that imports ray.

    runtime     start a local Ray bound to 127.0.0.1, or join a running cluster
    dispatch    on-demand work-unit dispatch and FailurePolicy: pure policies over status records (no Ray)
    worker      Worker: a plain class that streams units through a train.passes.PassRunner
    launcher    WorkerLauncher: starts worker actors, and replacements for dead ones
    evaluator   RayEvaluator: runs a pass over the workers, reduced in the canonical order, surviving worker failures
    recovery    the evaluator's failure handling: requeue, restart or replace a worker, or give up
    reduce      grouped and tree reductions: Ray tasks near the data form the canonical sum (workers.reduce)
    server      ParameterServer: a plain class owning θ and the optimizer (train.optim.Trainer)
    ray_session ClusterSession: composes the above into actors; what dist_sae.session opens
    multinode   several loopback Ray nodes on one machine, and θ pull timings (for benchmarks)

Workers and the server are plain classes, made remote only in `launcher` and `ray_session`, so they
can be tested without Ray.
"""
