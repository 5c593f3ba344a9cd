"""msn/tables.py: the markdown table writer, against tables written out by hand."""

from msn.tables import markdown_table, number_cell, records_table


def test_an_unpadded_table():
    assert markdown_table(["model", "img/s"], [["vit", "12.5"], ["fmnist_demo", "-"]]) == (
        "| model | img/s |\n"
        "|---|---|\n"
        "| vit | 12.5 |\n"
        "| fmnist_demo | - |"
    )


def test_a_padded_table_fits_each_column_to_its_widest_cell():
    assert markdown_table(["k", "top-1"], [["1", "52.10 +- 1.00"], ["10", "80.00 +- 0.25"]], padded=True) == (
        "| k  | top-1         |\n"
        "|----|---------------|\n"
        "| 1  | 52.10 +- 1.00 |\n"
        "| 10 | 80.00 +- 0.25 |"
    )


def test_a_table_without_rows_is_its_header_and_rule():
    assert markdown_table(["a", "bb"], [], padded=True) == "| a | bb |\n|---|----|"
    assert markdown_table(["a", "bb"], []) == "| a | bb |\n|---|---|"


def test_number_cells():
    assert [number_cell(v) for v in (None, 0.012345, 123.456, 1234.5, 2_000_000.0, 7, "x")] == [
        "-", "0.0123", "123", "1,234", "2,000,000", "7", "x"]


def test_records_table_reads_the_named_keys_under_their_titles():
    records = [{"model": "vit", "step_s": 0.5, "extra": 1}, {"model": "mini"}]
    assert records_table(records, ["model", "step_s"], ["model", "step (s)"]) == (
        "| model | step (s) |\n"
        "|---|---|\n"
        "| vit | 0.5 |\n"
        "| mini | - |"
    )
    assert records_table(records, ["model"]).splitlines()[0] == "| model |"
