"""`loralab studies`: list, show and copy the bundled study files."""

from __future__ import annotations

import yaml

from loralab import study as st
from loralab.cli.main import main


def test_studies_lists_every_bundled_study_on_one_line_each(capsys):
    assert main(["studies"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    bundled = st.bundled_studies()
    assert [line.split()[0] for line in lines] == sorted(bundled)
    for line in lines:
        desc = line.split(None, 1)[1]
        assert len(desc) <= 100 and desc.strip()
    # the description comes from the study's `description:` key when it has one
    raw = yaml.safe_load(bundled["default"].read_text())
    first = next(line for line in lines if line.split()[0] == "default").split(None, 1)[1]
    assert " ".join(str(raw["description"]).split()).startswith(first.rstrip(".").rstrip())


def test_studies_description_falls_back_to_the_leading_comment(tmp_path):
    from loralab.cli.studies import description

    path = tmp_path / "s.yaml"
    path.write_text("# Study 9: GPT-2 on a thing. Needs the hub.\n# more\nname: s\n")
    assert description(path) == "Study 9: GPT-2 on a thing."


def test_studies_show_and_copy(tmp_path, capsys):
    path = st.bundled_studies()["quant-offline"]
    assert main(["studies", "show", "quant-offline"]) == 0
    assert capsys.readouterr().out == path.read_text()
    dest = tmp_path / "mine.yaml"
    assert main(["studies", "copy", "quant-offline", str(dest)]) == 0
    # the copy is renamed after its file, so its results never land in the bundled study's
    # output folder (OUT/quant-offline); everything else is the bundled text
    assert dest.read_text() == path.read_text().replace("name: quant-offline\n", "name: mine\n")
    assert st.load_study(dest).name == "mine"
    assert "renamed to 'mine'" in capsys.readouterr().out
    assert main(["studies", "copy", "quant-offline", str(dest)]) == 2   # no silent overwrite
    assert "exists" in capsys.readouterr().err
    assert main(["studies", "copy", "default", str(tmp_path)]) == 0     # into a directory
    assert (tmp_path / "default.yaml").is_file()
    assert st.load_study(tmp_path / "default.yaml").name == "default"  # same stem: kept
    assert main(["studies", "show", "no-such-study"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no bundled study named 'no-such-study'" in err[0]
