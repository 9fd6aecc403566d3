"""Pipeline specs shipped with curate (installed as curate.pipelines so `curate run <preset>` works
from any directory). Each .toml is data: see curate/config.py for every key."""
