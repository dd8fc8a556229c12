"""`python -m cma_clip.bench`: the command line of the lab's bench (cma_clip/lab/bench.py).

Kept at this path for the public command; importing it imports nothing of the lab."""

if __name__ == "__main__":
    import sys

    from cma_clip.lab.bench import main

    sys.exit(main())
