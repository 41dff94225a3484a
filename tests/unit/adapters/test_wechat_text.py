"""WeChatTextRenderer: Dify's Markdown answers become plain text a WeChat customer can read (notes §1.11)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.outbound.wechat_text import MARKUP_BUDGET, MAX_RENDERED_CHARS, WeChatTextRenderer, markup_cost

render = WeChatTextRenderer()


# Plain text


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t\n"])
def test_empty_or_blank_input_renders_as_empty_string(text: str) -> None:
    assert render(text) == ""


@pytest.mark.parametrize(
    "text",
    [
        "Your order has shipped and should arrive on Friday.",
        "您好，您的订单已发货，预计周五送达！如有疑问，请随时联系我们。",
        "「退款」需要 3～5 个工作日；请耐心等待……",
    ],
)
def test_a_plain_sentence_comes_back_identical(text: str) -> None:
    assert render(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "3 * 4 = 12",
        "price_in_usd",
        "C# and F#",
        "5 > 3",
        "a - b + c",
        "50% off ~ today only",
        "snake_case_name and 2 * 3 * 4",
    ],
)
def test_literal_markdown_characters_in_content_survive(text: str) -> None:
    assert render(text) == text


def test_escaped_markdown_characters_are_kept_without_backslashes() -> None:
    assert render(r"\*not emphasis\* and \# not a heading") == "*not emphasis* and # not a heading"


def test_html_entities_are_decoded() -> None:
    assert render("Tom &amp; Jerry &lt;3 &copy; &#x4E2D;") == "Tom & Jerry <3 © 中"


# Lines and paragraphs


def test_soft_breaks_keep_lines_written_one_per_line() -> None:
    assert render("第一行\n第二行\n第三行") == "第一行\n第二行\n第三行"


def test_hard_breaks_become_newlines() -> None:
    assert render("one  \ntwo\\\nthree") == "one\ntwo\nthree"


def test_paragraphs_are_separated_by_exactly_one_blank_line() -> None:
    assert render("first\n\n\n\n\nsecond") == "first\n\nsecond"


def test_output_has_no_trailing_spaces_and_is_stripped() -> None:
    out = render("\n\n  hello   \nworld  \n\n\n")
    assert out == "hello\nworld"


# Headings and emphasis


def test_major_headings_become_their_text_followed_by_a_blank_line() -> None:
    assert render("# 退款说明\n请按以下步骤操作。") == "退款说明\n\n请按以下步骤操作。"
    assert render("Title\n=====\n\nBody") == "Title\n\nBody"


def test_minor_headings_sit_directly_on_top_of_their_section() -> None:
    assert render("### 第一步\n登录账号\n\n#### Step 2\nPay") == "第一步\n登录账号\n\nStep 2\nPay"


def test_emphasis_strong_and_strikethrough_become_plain_text() -> None:
    assert render("*a* _b_ **c** __d__ ***e*** ~~f~~") == "a b c d e f"


def test_strong_next_to_chinese_punctuation_is_still_recognised() -> None:
    # Plain CommonMark leaves these asterisks as text; Chinese answers are full of them.
    assert render("**注意：**请在三天内完成") == "注意：请在三天内完成"
    assert render("这是**“重要”**的事情") == "这是“重要”的事情"
    assert render("价格~~（原价）~~现价") == "价格（原价）现价"


def test_single_tildes_of_ranges_are_kept_not_struck_through() -> None:
    assert render("需要 3~5 个工作日，运费 10~20 元") == "需要 3~5 个工作日，运费 10~20 元"


def test_unmatched_delimiters_are_content() -> None:
    assert render("2 ** 10 is big") == "2 ** 10 is big"


# Code


def test_inline_code_loses_its_backticks_but_keeps_its_text() -> None:
    assert render("Run `pip install *` then `a_b`") == "Run pip install * then a_b"


def test_fenced_code_keeps_lines_and_indentation_without_fences() -> None:
    source = "Example:\n\n```python\ndef f():\n    return 3 * 4  # **not bold**\n```\n\nDone."
    assert render(source) == "Example:\n\ndef f():\n    return 3 * 4  # **not bold**\n\nDone."


def test_indented_code_keeps_its_lines() -> None:
    assert render("Before\n\n    x = 1\n      y = 2\n\nAfter") == "Before\n\nx = 1\n  y = 2\n\nAfter"


def test_tilde_fences_are_removed_too() -> None:
    assert render("~~~\n# not a heading\n~~~") == "# not a heading"


# Lists


def test_bullet_lists_use_bullets() -> None:
    assert render("- 苹果\n* 香蕉\n\n+ cherry") == "• 苹果\n\n• 香蕉\n\n• cherry"
    assert render("- one\n- two") == "• one\n• two"


def test_nested_bullets_are_indented_two_spaces_per_level() -> None:
    source = "- a\n  - b\n    - c\n- d"
    assert render(source) == "• a\n  ◦ b\n    ◦ c\n• d"


def test_ordered_lists_keep_their_start_number() -> None:
    assert render("1. 登录\n2. 下单") == "1. 登录\n2. 下单"
    assert render("3) three\n4) four") == "3. three\n4. four"


def test_list_item_continuation_lines_are_indented_under_the_item() -> None:
    assert (
        render("1. 第一步\n   补充说明\n\n   第二段\n2. 第二步")
        == "1. 第一步\n  补充说明\n  第二段\n2. 第二步"
    )


def test_ordered_list_nested_in_bullet_list() -> None:
    assert render("- 步骤\n  1. 登录\n  2. 付款") == "• 步骤\n  1. 登录\n  2. 付款"


def test_task_list_items_become_boxes() -> None:
    assert render("- [ ] 待办\n- [x] 已完成\n- [X] Done") == "☐ 待办\n☑ 已完成\n☑ Done"
    assert render("1. [x] first") == "1. ☑ first"


def test_an_empty_list_item_does_not_break_rendering() -> None:
    assert render("- a\n-\n- b") == "• a\n•\n• b"


# Links and images


def test_links_read_text_then_url_in_parentheses() -> None:
    assert render("详见[帮助中心](https://help.example.com/refund)。") == (
        "详见帮助中心 (https://help.example.com/refund)。"
    )


def test_links_whose_text_is_the_url_or_empty_show_just_the_url() -> None:
    assert render("[https://example.com](https://example.com)") == "https://example.com"
    assert render("[](https://example.com/a)") == "https://example.com/a"


def test_mail_links_show_the_address_once() -> None:
    assert render("[kf@example.com](mailto:kf@example.com)") == "kf@example.com"


def test_links_with_formatted_text_keep_only_the_text() -> None:
    assert render("[**官网**](https://example.com)") == "官网 (https://example.com)"


def test_autolinks_become_the_url() -> None:
    assert render("<https://example.com/x?a=1&b=2>") == "https://example.com/x?a=1&b=2"
    assert render("<service@example.com>") == "service@example.com"


def test_link_urls_are_shown_readable_not_percent_encoded() -> None:
    assert render("[文档](https://example.com/文档)") == "文档 (https://example.com/文档)"


def test_reference_style_links_are_resolved() -> None:
    source = "See [the guide][g] and [faq].\n\n[g]: https://example.com/guide\n[faq]: https://example.com/faq"
    assert render(source) == "See the guide (https://example.com/guide) and faq (https://example.com/faq)."


def test_a_link_without_destination_keeps_its_text() -> None:
    assert render("[click]()") == "click"


def test_link_and_image_titles_are_tooltips_and_leave_no_quotes() -> None:
    source = '[订单](https://example.com/1 "查看订单") 与 ![图](https://example.com/2 (示意))'
    assert render(source) == "订单 (https://example.com/1) 与 图: https://example.com/2"


def test_images_read_alt_then_url_or_just_the_url() -> None:
    assert render("![产品图](https://img.example.com/p.png)") == "产品图: https://img.example.com/p.png"
    assert render("![](https://img.example.com/p.png)") == "https://img.example.com/p.png"


# Tables


def test_table_rows_become_header_value_lines() -> None:
    source = (
        "| 套餐 | 价格 | 时长 |\n|:--|--:|:-:|\n| 基础版 | 99元 | 1个月 |\n| **专业版** | 199元 | 3个月 |"
    )
    assert render(source) == "套餐：基础版；价格：99元；时长：1个月\n套餐：专业版；价格：199元；时长：3个月"


def test_tables_without_cjk_text_use_ascii_punctuation() -> None:
    source = "| Plan | Price |\n|---|---|\n| Basic | $9 |\n| Pro | $19 |"
    assert render(source) == "Plan: Basic; Price: $9\nPlan: Pro; Price: $19"


def test_empty_cells_and_empty_headers_are_skipped() -> None:
    source = "|  | 价格 | 备注 |\n|---|---|---|\n| 基础版 | 99元 |  |"
    assert render(source) == "基础版；价格：99元"


def test_a_header_only_table_lists_its_headers() -> None:
    assert render("| a | b |\n|---|---|") == "a; b"


def test_line_breaks_inside_cells_become_spaces() -> None:
    assert render("| k | v |\n|---|---|\n| x | 1<br>2 |") == "k: x; v: 1 2"


def test_a_table_is_separated_from_surrounding_paragraphs() -> None:
    source = "价格如下：\n\n| 套餐 | 价格 |\n|---|---|\n| 基础版 | 99元 |\n\n欢迎咨询。"
    assert render(source) == "价格如下：\n\n套餐：基础版；价格：99元\n\n欢迎咨询。"


# Blockquotes and rules


def test_a_table_in_a_list_item_is_the_items_table_not_a_table_of_markers() -> None:
    assert render("- 型号 | 价格\n  --- | ---\n  A1 | 99 元") == "• 型号：A1；价格：99 元"


def test_a_table_in_a_quote_keeps_the_quote_bar() -> None:
    assert render("> 型号 | 价格\n> --- | ---\n> A1 | 99 元") == "｜ 型号：A1；价格：99 元"


def test_blockquotes_are_marked_with_a_full_width_bar() -> None:
    assert render("> 温馨提示\n> 请保留发票") == "｜ 温馨提示\n｜ 请保留发票"


def test_nested_blockquotes_and_paragraphs_inside_quotes() -> None:
    assert render("> a\n>\n> > b") == "｜ a\n｜\n｜ ｜ b"


@pytest.mark.parametrize("rule", ["---", "***", "___", "- - -"])
def test_horizontal_rules_become_a_dash_line(rule: str) -> None:
    assert render(f"above\n\n{rule}\n\nbelow") == "above\n\n——————\n\nbelow"


# HTML


def test_inline_html_tags_are_dropped_and_their_text_kept() -> None:
    assert render("<b>重要</b>：请<span style='color:red'>尽快</span>处理") == "重要：请尽快处理"


def test_br_tags_become_newlines() -> None:
    assert render("第一行<br>第二行<br/>第三行<BR />第四行") == "第一行\n第二行\n第三行\n第四行"


def test_html_comments_vanish() -> None:
    assert render("a <!-- hidden --> b") == "a  b"


def test_html_blocks_keep_their_text() -> None:
    assert render("<div>\n  <p>Hello <b>there</b></p>\n</div>\n\nBye") == "Hello there\n\nBye"


def test_cdata_in_html_keeps_its_text() -> None:
    assert render("<![CDATA[\n原样显示\n]]>") == "原样显示"


def test_scripts_and_styles_in_html_blocks_vanish() -> None:
    assert render("<style>\np { color: red }\n</style>\n\ntext") == "text"


# Reasoning


def test_think_blocks_are_removed() -> None:
    assert render("<think>\n用户想退款……\n</think>\n\n您好，可以退款。") == "您好，可以退款。"


def test_thinking_blocks_are_removed_case_insensitively() -> None:
    assert render("<THINKING>\nhmm\n\n# plan\n</Thinking>\nAnswer") == "Answer"


def test_details_thinking_blocks_from_dify_are_removed() -> None:
    source = (
        '<details style="color:gray;background-color: #f8f8f8;padding: 8px;border-radius: 4px;" open> '
        "<summary> Thinking... </summary>\n\n> 用户问的是价格\n\n</details>\n\n**基础版**99元。"
    )
    assert render(source) == "基础版99元。"


def test_nested_details_are_removed_as_one_block() -> None:
    assert render("<details><details>inner</details>outer</details>answer") == "answer"


def test_several_reasoning_blocks_are_all_removed() -> None:
    assert render("<think>a</think>one <think>b</think>two") == "one two"


def test_an_unterminated_think_at_the_start_means_everything_is_reasoning() -> None:
    assert render("<think>\nstill thinking when the stream was cut") == ""
    assert render("  \n<think>reasoning\n\nmore") == ""


def test_an_unterminated_think_after_an_answer_only_loses_its_tag() -> None:
    assert render("答案在这里 <think>后面的文字") == "答案在这里 后面的文字"


def test_a_closing_think_without_an_opening_tag_ends_the_reasoning() -> None:
    # DeepSeek-R1's chat template puts "<think>" in the prompt; the answer only carries "</think>".
    assert render("用户在问价格。\n</think>\n\n基础版99元。") == "基础版99元。"


def test_a_complete_think_block_followed_by_a_stray_close_keeps_the_answer() -> None:
    assert render("<think>a</think>答案</think>继续") == "答案继续"


def test_escaped_think_tags_never_reach_the_customer() -> None:
    assert render("&lt;think&gt;x&lt;/think&gt; done") == "x done"


def test_reasoning_can_be_kept_as_text_when_stripping_is_off() -> None:
    keep = WeChatTextRenderer(strip_reasoning=False)
    assert keep("<think>\nreasoning\n</think>\n\nanswer") == "reasoning\n\nanswer"


# A realistic answer


def test_a_typical_dify_answer_reads_cleanly() -> None:
    source = """<think>
用户想知道会员套餐。
</think>

## 会员套餐

我们提供以下两种**会员套餐**：

| 套餐 | 价格 |
| --- | --- |
| 基础版 | 99元/月 |
| 专业版 | 199元/月 |

### 如何开通
1. 打开 *App*，进入「我的」
2. 点击`开通会员`
   - 支持微信支付
   - 支持支付宝

> 注意：优惠价仅限**本月**。

更多信息见[帮助中心](https://help.example.com)。"""
    assert render(source) == (
        "会员套餐\n\n"
        "我们提供以下两种会员套餐：\n\n"
        "套餐：基础版；价格：99元/月\n"
        "套餐：专业版；价格：199元/月\n\n"
        "如何开通\n"
        "1. 打开 App，进入「我的」\n"
        "2. 点击开通会员\n"
        "  ◦ 支持微信支付\n"
        "  ◦ 支持支付宝\n\n"
        "｜ 注意：优惠价仅限本月。\n\n"
        "更多信息见帮助中心 (https://help.example.com)。"
    )


# Properties

_fragments = st.sampled_from(
    [
        "<think>", "</think>", "<THINKING>", "</thinking>", "<details>", "</details>", "<summary>",
        "&lt;think&gt;", "\\<think>", "**", "*", "_", "~~", "`", "```", "#", "> ", "- ", "1. ", "|", "---",
        "[", "]", "(", ")", "![", "<", ">", "&amp;", "<br>", "\n", "\n\n", "  ", "\t", "中文", "：", "a",
    ]
)  # fmt: skip
_markdownish = st.lists(st.one_of(_fragments, st.text(max_size=8)), max_size=40).map("".join)


@settings(max_examples=300, deadline=None, database=None)
@given(_markdownish)
def test_any_text_renders_without_error_or_reasoning_tags(source: str) -> None:
    out = render(source)
    assert "<think>" not in out.lower()
    assert out == out.strip()
    assert "\n\n\n" not in out
    assert all(line == line.rstrip() for line in out.split("\n"))


@settings(max_examples=200, deadline=None, database=None)
@given(st.text())
def test_arbitrary_unicode_never_raises(source: str) -> None:
    assert isinstance(render(source), str)


# Hostile sizes and shapes (rendering runs on the event loop)


def test_an_answer_longer_than_can_be_sent_is_cut_at_a_line_end() -> None:
    line = "这是一行很长的回答内容。" * 4
    text = render("\n".join([line] * 2000))

    assert len(text) <= MAX_RENDERED_CHARS
    assert text.endswith(line)


def test_a_long_reasoning_block_does_not_cost_the_answer_after_it() -> None:
    thinking = "想一想。" * (MAX_RENDERED_CHARS * 2)

    assert render(f"<think>{thinking}</think>\n\n**答案**：可以退款。") == "答案：可以退款。"


def test_markup_markdown_it_would_be_slow_on_gets_a_plain_cleanup() -> None:
    # 400 openers in one 12 KB paragraph: over the budget, so no markdown-it.
    source = "## 说明\n\n" + "**注意** 请看[帮助](https://help.example/a)。" * 400 + "\n\n- 一\n> 引用"
    assert markup_cost(source) > MARKUP_BUDGET

    text = render(source)

    assert text.startswith("说明\n\n注意 请看帮助 (https://help.example/a)。")
    assert "**" not in text and "](" not in text
    assert len(text) <= MAX_RENDERED_CHARS


def test_the_plain_cleanup_keeps_list_and_quote_markers_readable() -> None:
    source = "<b>粗体</b>\n" + "\n".join(f"- 第{i}项 &amp; 说明" for i in range(1200)) + "\n> 引用"

    text = render(source)

    assert text.startswith("粗体\n• 第0项 & 说明\n• 第1项 & 说明")
    assert "<b>" not in text


def test_an_ordinary_answer_stays_within_the_budget() -> None:
    answer = "\n\n".join(
        [
            "## 退款说明",
            "**注意**：请查看[帮助中心](https://help.example.com/a)了解详情。",
            "- 一\n- 二\n- 三",
        ]
        * 60
    )

    assert markup_cost(answer) <= MARKUP_BUDGET
    assert render(answer).startswith(
        "退款说明\n\n注意：请查看帮助中心 (https://help.example.com/a)了解详情。"
    )


@pytest.mark.parametrize(
    "source",
    [
        "<think" * 20000,
        "<details>" * 20000,
        "</think" * 20000,
        "<div " * 20000,
        "*a" * 50000,
        "[a](" * 30000,
        "`" * 100000,
        "> " * 50000,
        "- " * 50000,
    ],
    ids=["think", "details", "close-think", "div", "emphasis", "links", "backticks", "quotes", "lists"],
)
def test_pathological_markup_renders_to_a_bounded_text(source: str) -> None:
    assert len(render(source)) <= MAX_RENDERED_CHARS
