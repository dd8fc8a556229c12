"""`python -m cma_clip.experiments`: the command line of the lab's experiments (cma_clip/lab/experiments.py).

Kept at this path for the public command; importing it imports nothing of the lab."""

if __name__ == "__main__":
    import sys

    from cma_clip.lab.experiments import main

    sys.exit(main())
