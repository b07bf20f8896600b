// Building elements without markup: children are nodes or plain text (Text nodes), never HTML.

export function el(tag, ...children) {
  const node = document.createElement(tag);
  node.append(...children.map((c) => (typeof c === "number" ? String(c) : c ?? "")));
  return node;
}

export function withClass(node, className) {
  node.className = className;
  return node;
}
