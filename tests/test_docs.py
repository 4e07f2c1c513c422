"""The README's config reference is what the config models accept."""

from pathlib import Path

from privtune.config_reference import BEGIN, END, reference


def test_readme_config_reference_is_generated_from_the_models():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index(BEGIN) + len(BEGIN):readme.index(END)].strip()
    assert section == reference(), "README config reference is stale: run python -m privtune.config_reference"
