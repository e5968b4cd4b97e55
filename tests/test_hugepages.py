from me_local.backends.hugepages import HUGE, added_ranges, anonymous_ranges, huge_aligned

MAPS = """\
55db5cfd8000-55db6094e000 rw-p 00000000 00:00 0                          [heap]
7f80b4021000-7f80b8000000 ---p 00000000 00:00 0
7f80bc855000-7f80f1afd000 rw-p 00000000 00:00 0
7f80f2000000-7f80f2100000 r--p 00000000 fd:01 123                        /usr/lib/libc.so.6
"""


def test_anonymous_ranges_are_the_pathless_mappings():
    assert anonymous_ranges(MAPS) == [(0x7F80B4021000, 0x7F80B8000000), (0x7F80BC855000, 0x7F80F1AFD000)]


def test_added_ranges_are_what_before_did_not_cover():
    before = [(100, 200), (300, 400)]
    after = [(50, 450)]  # the load grew and merged the mappings
    assert added_ranges(before, after) == [(50, 100), (200, 300), (400, 450)]
    assert added_ranges(before, before) == []


def test_huge_aligned_keeps_whole_huge_pages_only():
    assert huge_aligned([(1, 3 * HUGE + 5), (4 * HUGE, 4 * HUGE + HUGE - 1)]) == [(HUGE, 3 * HUGE)]
