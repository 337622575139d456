#!/usr/bin/env python3
"""List each crate's module imports and fail on a circle.

For every crate under `crates/`, each source file is a module. A module depends on another when
it names it through `crate::`, `super::` or `self::` (in a `use` or inline), outside `#[cfg(test)]`
blocks. Names re-exported by a `lib.rs` or `mod.rs` (`pub use child::Item`) resolve to the module
that defines them; a parent declaring or re-exporting its children is not a dependency.

Usage:
    python3 scripts/check_modules.py [--list] [crates/NAME ...]

Exits 1 and prints every circle (strongly connected component) found; `--list` also prints each
module's imports.
"""

import argparse
import os
import re
import sys

PATH_RE = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE_RE = re.compile(r"\b(?:pub(?:\([a-z]+\))?\s+)?use\s+([^;]+);", re.S)
MOD_RE = re.compile(r"^\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s+([A-Za-z_][A-Za-z0-9_]*)\s*;", re.M)


def strip_comments_and_strings(text):
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'r#*"(?:.|\n)*?"#*', '""', text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    text = re.sub(r"'(?:\\.|[^'\\])'", "' '", text)
    return text


def strip_test_blocks(text):
    """Removes `#[cfg(test)]` items (a `mod tests { ... }` or a single item)."""
    out = []
    i = 0
    while True:
        j = text.find("#[cfg(test)]", i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        k = j + len("#[cfg(test)]")
        # The item ends at a `;` before any `{`, or at the `}` matching the first `{`.
        depth = 0
        while k < len(text):
            c = text[k]
            if c == ";" and depth == 0:
                k += 1
                break
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    k += 1
                    break
            k += 1
        i = k
    return "".join(out)


def module_files(src):
    """{module path tuple: file} for one crate's src folder."""
    modules = {}
    for root, _dirs, files in os.walk(src):
        for name in files:
            if not name.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(root, name), src)
            parts = rel[:-3].split(os.sep)
            if parts[-1] in ("mod", "lib", "main"):
                parts = parts[:-1]
            modules[tuple(parts)] = os.path.join(root, name)
    return modules


def expand_use(tree):
    """Expands a `use` tree (`a::{b, c::{d}}`) into paths."""
    tree = re.sub(r"\s+", "", tree)

    def split_top(s):
        parts, depth, cur = [], 0, ""
        for c in s:
            if c == "," and depth == 0:
                parts.append(cur)
                cur = ""
                continue
            depth += c == "{"
            depth -= c == "}"
            cur += c
        if cur:
            parts.append(cur)
        return parts

    def walk(prefix, s):
        if "{" in s and s.endswith("}"):
            head, _, body = s.partition("{")
            for part in split_top(body[:-1]):
                yield from walk(prefix + head, part)
        else:
            yield prefix + re.sub(r"\bas\b.*", "", s)

    yield from walk("", tree)


class Crate:
    def __init__(self, path):
        self.name = os.path.basename(path)
        self.modules = module_files(os.path.join(path, "src"))
        self.texts = {}
        for module, file in self.modules.items():
            with open(file, encoding="utf-8") as f:
                self.texts[module] = strip_test_blocks(strip_comments_and_strings(f.read()))
        # Re-exports: (module, name) -> the absolute path it stands for.
        self.reexports = {}
        for module, text in self.texts.items():
            for m in USE_RE.finditer(text):
                if not m.group(0).lstrip().startswith("pub"):
                    continue
                for path in expand_use(m.group(1)):
                    segs = path.split("::")
                    absolute = self.absolute(module, segs)
                    if absolute is not None:
                        self.reexports[(module, segs[-1])] = absolute

    def absolute(self, module, segs):
        """Resolves a path written in `module` to absolute segments, or None if external."""
        if not segs:
            return None
        head = segs[0]
        if head == "crate":
            return list(segs[1:])
        if head == "self":
            return list(module) + list(segs[1:])
        if head == "super":
            base = list(module)
            rest = list(segs)
            while rest and rest[0] == "super":
                base = base[:-1]
                rest = rest[1:]
            return base + rest
        # A child module named directly from its parent (`use child::X` in a mod.rs).
        if tuple(list(module) + [head]) in self.modules:
            return list(module) + list(segs)
        return None

    def target_module(self, segs, seen=0):
        """The module an absolute path lands in (following re-exports), or None."""
        if seen > 8:
            return None
        best = ()
        for n in range(len(segs), 0, -1):
            if tuple(segs[:n]) in self.modules:
                best = tuple(segs[:n])
                break
        rest = segs[len(best):]
        if rest and (best, rest[0]) in self.reexports:
            return self.target_module(self.reexports[(best, rest[0])] + rest[1:], seen + 1)
        return best

    def edges(self):
        graph = {m: set() for m in self.modules}
        for module, text in self.texts.items():
            body = MOD_RE.sub("", text)
            paths = []
            for m in USE_RE.finditer(body):
                is_pub = m.group(0).lstrip().startswith("pub")
                for path in expand_use(m.group(1)):
                    segs = path.split("::")
                    absolute = self.absolute(module, segs)
                    if absolute is None:
                        continue
                    # A parent re-exporting its own descendants is not a dependency.
                    if is_pub and tuple(absolute[: len(module)]) == module and len(absolute) > len(module):
                        continue
                    paths.append(absolute)
            rest = USE_RE.sub("", body)
            for m in PATH_RE.finditer(rest):
                segs = [m.group(1)] + m.group(2).split("::")[1:]
                absolute = self.absolute(module, segs)
                if absolute is not None:
                    paths.append(absolute)
            for absolute in paths:
                target = self.target_module(absolute)
                if target is None or target == module or target == ():
                    continue
                graph[module].add(target)
        return graph


def circles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def name(module):
    return "::".join(module) or "(root)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crates", nargs="*")
    parser.add_argument("--list", action="store_true", help="print each module's imports")
    args = parser.parse_args()
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    crates = args.crates or sorted(
        os.path.join(root, "crates", c) for c in os.listdir(os.path.join(root, "crates"))
    )
    failed = False
    for path in crates:
        crate = Crate(path)
        graph = crate.edges()
        if args.list:
            print(f"# {crate.name}")
            for module in sorted(graph):
                deps = ", ".join(name(d) for d in sorted(graph[module]))
                print(f"  {name(module)} -> {deps}")
        found = circles(graph)
        for component in found:
            failed = True
            print(f"{crate.name}: import circle: {' <-> '.join(name(m) for m in component)}")
        if not found:
            print(f"{crate.name}: {len(graph)} modules, no import circle")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
