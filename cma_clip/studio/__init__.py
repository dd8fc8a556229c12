"""The app without its Gradio layer, tested without a browser.

`service`: the app's actions (`Studio`: models, predictions, corrections, history, export,
review queue, robustness), input cleaning and limits. `views`: how their results are shown
(table rows, token choices, heatmaps, text shading, charts, status lines). `app.py` lays out
the components and wires their events to both. The service's public names are re-exported here.
"""
from .service import (CHECKPOINT_DIR, MAX_SWEEP_ITEMS, MAX_TASKS, MAX_TEXT_CHARS, ReviewItem, ReviewQueue,
                      Studio, StudioError, available_checkpoints, clean_text, default_data_dir, open_user_image)

__all__ = ["CHECKPOINT_DIR", "MAX_SWEEP_ITEMS", "MAX_TASKS", "MAX_TEXT_CHARS", "ReviewItem", "ReviewQueue", "Studio",
           "StudioError", "available_checkpoints", "clean_text", "default_data_dir", "open_user_image"]
