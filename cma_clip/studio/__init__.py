"""The app without its Gradio layer, tested without a browser.

`service`: the app's actions (`Studio`: models, predictions, checked saves, history, audit,
agreement, export, the review queue and its decisions, robustness), input cleaning and
limits. `workflow`: the review queue's records and the actions' outcomes. `views`: how
their results are shown (table rows, token choices, heatmaps, text shading, charts, status
lines). `app.py` lays out the components and wires their events to them. The public names
are re-exported here.
"""
from .service import (CHECKPOINT_DIR, MAX_QUEUE_ITEMS, MAX_SWEEP_ITEMS, MAX_TASKS, MAX_TEXT_CHARS, SPLITS, Studio,
                      StudioError, available_checkpoints, clean_text, default_data_dir, open_user_image, text_is_cut)
from .workflow import (ALL_TASKS, CHOICES_KEPT, SPLIT_NOTES, THRESHOLDS, BulkOutcome, ItemView, ReviewItem,
                       ReviewQueue, SaveOutcome, Shown, UndoOutcome, new_id)

__all__ = ["ALL_TASKS", "CHECKPOINT_DIR", "CHOICES_KEPT", "MAX_QUEUE_ITEMS", "MAX_SWEEP_ITEMS", "MAX_TASKS",
           "MAX_TEXT_CHARS", "SPLITS", "SPLIT_NOTES", "THRESHOLDS", "BulkOutcome", "ItemView", "ReviewItem",
           "ReviewQueue", "SaveOutcome", "Shown", "Studio", "StudioError", "UndoOutcome", "available_checkpoints",
           "clean_text", "default_data_dir", "new_id", "open_user_image", "text_is_cut"]
