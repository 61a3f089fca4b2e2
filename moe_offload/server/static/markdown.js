// A small Markdown renderer for model answers that builds DOM nodes and never parses HTML:
// every piece of model text reaches the page through createTextNode/textContent, so an answer
// containing <script> or <img onerror> is shown as text. Covers what chat answers use: fenced code
// (an unclosed fence while streaming is still code), headings, lists, quotes, tables, rules,
// `code`, **bold**, *italic* and [links](https://...) (http and https only).

const FENCE = /^\s*(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^\s{0,3}>\s?/;
const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_RULE = /^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$/;
const INLINE = /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*|__(?=\S)([\s\S]*?\S)__|\*(?=[^\s*])([^*]*?[^\s*]|[^\s*])\*|(?<![\w])_(?=[^\s_])([^_]*?[^\s_]|[^\s_])_(?![\w])|\[([^\]\n]+)\]\(([^()\s]+)\)/g;

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

function isBlockStart(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
}

/** Render Markdown `text` into a DocumentFragment. */
export function renderMarkdown(text) {
  const frag = document.createDocumentFragment();
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) {
      i++;
    } else if ((m = line.match(FENCE))) {
      const body = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(m[1]); i++) body.push(lines[i]);
      i++; // the closing fence, or past the end while the answer is still streaming
      frag.append(codeBlock(body.join("\n"), m[2]));
    } else if ((m = line.match(HEADING))) {
      const h = el("h" + Math.min(m[1].length + 2, 6));
      inline(h, m[2]);
      frag.append(h);
      i++;
    } else if (RULE.test(line)) {
      frag.append(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const inner = [];
      for (; i < lines.length && QUOTE.test(lines[i]); i++) inner.push(lines[i].replace(QUOTE, ""));
      const quote = el("blockquote");
      quote.append(renderMarkdown(inner.join("\n")));
      frag.append(quote);
    } else if (ITEM.test(line)) {
      i = list(lines, i, frag);
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1])) {
      i = table(lines, i, frag);
    } else {
      const para = [];
      for (; i < lines.length && lines[i].trim() && (para.length === 0 || !isBlockStart(lines[i])); i++) {
        para.push(lines[i]);
      }
      const p = el("p");
      inline(p, para.join("\n"));
      frag.append(p);
    }
  }
  return frag;
}

function codeBlock(code, lang) {
  const box = el("div", "code");
  const head = el("div", "code-head");
  const label = el("span");
  label.textContent = lang || "code";
  head.append(label);
  if (navigator.clipboard) {
    const copy = el("button", "copy");
    copy.type = "button";
    copy.textContent = "Copy";
    copy.addEventListener("click", () => {
      navigator.clipboard.writeText(code).then(() => { copy.textContent = "Copied"; }, () => { copy.textContent = "Copy failed"; });
    });
    head.append(copy);
  }
  const pre = el("pre");
  const codeNode = el("code");
  codeNode.textContent = code;
  pre.append(codeNode);
  box.append(head, pre);
  return box;
}

function list(lines, i, frag) {
  const ordered = /\d/.test(lines[i].match(ITEM)[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered) node.start = parseInt(lines[i].match(ITEM)[2], 10);
  let item = null;
  let text = [];
  const flush = () => { if (item) { inline(item, text.join("\n")); node.append(item); } };
  for (; i < lines.length; i++) {
    const m = lines[i].match(ITEM);
    if (m && /\d/.test(m[2]) === ordered) {
      flush();
      item = el("li");
      if (m[1].length >= 2) item.className = "nested"; // one visual level of nesting
      text = [m[3]];
    } else if (lines[i].trim() && !isBlockStart(lines[i])) {
      text.push(lines[i].trim()); // a continuation line of the current item
    } else {
      break;
    }
  }
  flush();
  frag.append(node);
  return i;
}

function cells(line) {
  return line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
}

function table(lines, i, frag) {
  const wrap = el("div", "table");
  const t = el("table");
  const headRow = el("tr");
  for (const c of cells(lines[i])) {
    const th = el("th");
    inline(th, c);
    headRow.append(th);
  }
  const thead = el("thead");
  thead.append(headRow);
  const tbody = el("tbody");
  for (i += 2; i < lines.length && lines[i].includes("|") && lines[i].trim(); i++) {
    const tr = el("tr");
    for (const c of cells(lines[i])) {
      const td = el("td");
      inline(td, c);
      tr.append(td);
    }
    tbody.append(tr);
  }
  t.append(thead, tbody);
  wrap.append(t);
  frag.append(wrap);
  return i;
}

function safeUrl(href) {
  try {
    const url = new URL(href);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

/** Append `text` with inline Markdown to `parent`, as text nodes and formatting elements. */
export function inline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
    last = m.index + m[0].length;
    let node;
    if (m[1] !== undefined) {
      node = el("code");
      node.textContent = m[2];
    } else if (m[3] !== undefined || m[4] !== undefined) {
      node = el("strong");
      inline(node, m[3] ?? m[4]);
    } else if (m[5] !== undefined || m[6] !== undefined) {
      node = el("em");
      inline(node, m[5] ?? m[6]);
    } else {
      const href = safeUrl(m[8]);
      if (!href) {
        parent.append(document.createTextNode(m[0]));
        continue;
      }
      node = el("a");
      node.href = href;
      node.target = "_blank";
      node.rel = "noopener noreferrer";
      inline(node, m[7]);
    }
    parent.append(node);
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}
