"""The lab: what measures the library and the studio, on top of both and imported by neither.

    python -m cma_clip.bench             latency, throughput and the app's /predict (bench.py)
    python -m cma_clip.experiments       the study: baselines, ablations, noise (experiments.py)
    python -m cma_clip.lab.late_ensembles   the linear late-fusion baseline and seed ensembles
    python -m cma_clip.lab.noise_curves  each corruption alone: a deployed auto-accept under noise
    python -m cma_clip.lab.load_test     concurrent load on the running app
    python -m cma_clip.lab.stress_labels concurrent writers and kills on the label store
    python -m cma_clip.lab.compare_image_encoders   the image-encoder choice
"""
