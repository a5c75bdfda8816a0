"""Model card templates written next to checkpoints that dgemma_hf creates or exports."""

from importlib import resources
from string import Template


def render_model_card(template_name: str, **fields) -> str:
    """Fills `$name` placeholders of a packaged template; a missing field raises KeyError naming it."""
    template = resources.files(__name__).joinpath(template_name)
    if not template.is_file():
        raise ValueError(f"render_model_card: no model card template named {template_name!r}")
    return Template(template.read_text(encoding="utf-8")).substitute(fields)
