//! The tables the client subcommands print (`events`, `verdict`, `hosts`, `workers`,
//! `stats`): columns aligned by `comfy-table`, no borders, two spaces between columns, counts
//! right-aligned, and never wrapped to a terminal's width, so that every row stays one line for
//! `grep`. `--json` is the format for programs; this one is for people.

use comfy_table::{CellAlignment, Table, presets};

/// A table with `header` (none when empty).
pub fn new(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    if !header.is_empty() {
        t.set_header(header.to_vec());
    }
    t
}

/// The table as printed, the columns at indices `right` (counts) aligned right: one line per
/// row, without trailing blanks.
pub fn render(mut t: Table, right: &[usize]) -> String {
    for (i, c) in t.column_iter_mut().enumerate() {
        c.set_padding((0, 2));
        if right.contains(&i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t.trim_fmt()
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_align_counts_to_the_right_and_rows_stay_whole() {
        let mut t = super::new(&["NODE", "DENIED", "PATH"]);
        t.add_row(vec!["a", "7", "/srv/x"]);
        t.add_row(vec!["node-b", "1234", &"/long".repeat(40)]);
        let text = super::render(t, &[1]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "NODE    DENIED  PATH");
        assert_eq!(lines[1], "a            7  /srv/x");
        assert_eq!(lines[2], format!("node-b    1234  {}", "/long".repeat(40)));
        assert_eq!(lines.len(), 3);
    }
}
