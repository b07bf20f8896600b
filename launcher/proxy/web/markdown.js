// Markdown to DOM nodes, for model output: fenced code blocks, inline code, headings,
// lists, quotes, rules, bold, italics and http(s) links.
//
// Safety by construction: nothing here parses HTML. Every piece of text becomes a Text node
// (ParentNode.append with a string), elements are made with createElement from a fixed set
// of tag names, and the only attribute taken from the text is a link's href, and only when
// it is http:, https: or mailto:. A reply saying "<script>" shows those characters.
//
// Why not a library: marked or markdown-it produce an HTML string, which then needs a
// sanitizer (DOMPurify) before it may touch the page: two vendored libraries, ~60 kB, and
// a safety that depends on the sanitizer's configuration. This subset is what chat replies
// use, and building nodes directly leaves no HTML to sanitize.

import { el } from "./dom.js";

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const INLINE = new RegExp(
  [
    "(`+)([\\s\\S]+?)\\1(?!`)", // 1,2: code span
    "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*", // 3: strong
    "(?<!\\w)__(?=\\S)([\\s\\S]*?\\S)__(?!\\w)", // 4: strong
    "\\*(?=[^\\s*])([\\s\\S]*?[^\\s*])\\*", // 5: emphasis
    "(?<!\\w)_(?=[^\\s_])([\\s\\S]*?[^\\s_])_(?!\\w)", // 6: emphasis
    "\\[([^\\]\\n]+)\\]\\(([^()\\s]+)\\)", // 7,8: link
  ].join("|"),
  "g",
);
const SAFE_URL = /^(https?:\/\/|mailto:)/i;

export function renderMarkdown(source) {
  const root = document.createDocumentFragment();
  appendBlocks(root, source.replace(/\r\n?/g, "\n").split("\n"));
  return root;
}

function appendBlocks(root, lines) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i += 1;
    } else if (FENCE.test(line)) {
      i = codeBlock(root, lines, i);
    } else if (HEADING.test(line)) {
      const [, hashes, text] = line.match(HEADING);
      root.append(el(`h${Math.min(hashes.length + 2, 6)}`, inline(text)));
      i += 1;
    } else if (RULE.test(line)) {
      root.append(el("hr"));
      i += 1;
    } else if (QUOTE.test(line)) {
      i = quote(root, lines, i);
    } else if (ITEM.test(line)) {
      i = list(root, lines, i);
    } else {
      i = paragraph(root, lines, i);
    }
  }
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line)
    || ITEM.test(line);
}

// A fence runs to its closing fence, or to the end (a reply still streaming).
function codeBlock(root, lines, start) {
  const [, marker, lang] = lines[start].match(FENCE);
  const body = [];
  let i = start + 1;
  while (i < lines.length) {
    const close = lines[i].match(/^ {0,3}(`{3,}|~{3,})\s*$/);
    if (close && close[1][0] === marker[0] && close[1].length >= marker.length) {
      i += 1;
      break;
    }
    body.push(lines[i]);
    i += 1;
  }
  while (body.length && !body[body.length - 1].trim()) body.pop();
  const code = el("code", body.join("\n"));
  const pre = el("pre", code);
  if (lang) {
    code.className = `language-${lang}`;
    pre.dataset.lang = lang;
  }
  root.append(pre);
  return i;
}

function quote(root, lines, start) {
  const inner = [];
  let i = start;
  while (i < lines.length && QUOTE.test(lines[i])) {
    inner.push(lines[i].match(QUOTE)[1]);
    i += 1;
  }
  const block = el("blockquote");
  appendBlocks(block, inner);
  root.append(block);
  return i;
}

// One flat list; an indented or wrapped line continues the item above it.
function list(root, lines, start) {
  const ordered = /\d/.test(lines[start].match(ITEM)[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered) {
    const first = parseInt(lines[start].match(ITEM)[2], 10);
    if (first !== 1) node.start = first;
  }
  let item = null;
  let i = start;
  while (i < lines.length && lines[i].trim()) {
    const m = lines[i].match(ITEM);
    if (m) {
      item = el("li", inline(m[3]));
      node.append(item);
    } else if (startsBlock(lines[i])) {
      break;
    } else {
      item.append(el("br"), inline(lines[i].trim()));
    }
    i += 1;
  }
  root.append(node);
  return i;
}

function paragraph(root, lines, start) {
  const p = el("p");
  let i = start;
  while (i < lines.length && lines[i].trim() && (i === start || !startsBlock(lines[i]))) {
    if (i > start) p.append(el("br"));
    p.append(inline(lines[i]));
    i += 1;
  }
  root.append(p);
  return i;
}

export function inline(text) {
  const frag = document.createDocumentFragment();
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    frag.append(text.slice(last, m.index), inlineNode(m));
    last = m.index + m[0].length;
  }
  frag.append(text.slice(last));
  return frag;
}

function inlineNode(m) {
  if (m[1]) return el("code", m[2]);
  if (m[3] || m[4]) return el("strong", inline(m[3] || m[4]));
  if (m[5] || m[6]) return el("em", inline(m[5] || m[6]));
  if (m[7] && SAFE_URL.test(m[8])) {
    const a = el("a", inline(m[7]));
    a.href = m[8];
    a.rel = "noopener noreferrer nofollow";
    a.target = "_blank";
    return a;
  }
  return m[0];
}
