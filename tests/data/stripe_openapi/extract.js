// Extracts the JSON Schemas of the Stripe objects the sandbox serves (see NOTE for the provenance).
//
// Input: the type declarations of stripe-node (generated from Stripe's OpenAPI spec), whose
// interfaces keep the spec's `required` (no `?`), `nullable` (`| null`), types, enums and $refs.
// Output: one JSON Schema (draft 2020-12) whose $defs are the closure of the given roots; a
// resource the sandbox does not serve (Account, Charge, ...) is kept as a stub {id, object}.
//
//   npm pack stripe@20.3.1 typescript@5.6.3   # then untar both: ./package (stripe), ./typescript
//   node extract.js package/types <roots> stripe_objects.schema.json   # roots: see NOTE
const ts = require(process.env.TYPESCRIPT || './typescript/lib/typescript.js');
const fs = require('fs');
const path = require('path');

const dir = process.argv[2];
const roots = process.argv[3].split(',');
const out = process.argv[4];

const files = [];
(function walk(d) {
  for (const f of fs.readdirSync(d)) {
    const p = path.join(d, f);
    if (fs.statSync(p).isDirectory()) walk(p);
    else if (p.endsWith('.d.ts')) files.push(p);
  }
})(dir);

const program = ts.createProgram(files, {noResolve: false, types: [], noLib: false});
const checker = program.getTypeChecker();

// qualified name -> declaration (interface or type alias) inside `namespace Stripe`
const decls = new Map();
function qual(node) {
  const parts = [];
  let n = node;
  while (n) {
    if ((ts.isModuleDeclaration(n) || ts.isInterfaceDeclaration(n) || ts.isTypeAliasDeclaration(n)) && n.name && ts.isIdentifier(n.name)) {
      parts.unshift(n.name.text);
    }
    n = n.parent;
  }
  if (parts[0] !== 'Stripe') return null;
  return parts.slice(1).join('.');
}
for (const sf of program.getSourceFiles()) {
  if (!sf.fileName.startsWith(dir)) continue;
  (function visit(node) {
    if (ts.isInterfaceDeclaration(node) || ts.isTypeAliasDeclaration(node)) {
      const q = qual(node);
      if (q && !q.endsWith('Params') && !q.includes('Params.')) {
        if (!decls.has(q)) decls.set(q, []);
        decls.get(q).push(node);
      }
    }
    ts.forEachChild(node, visit);
  })(sf);
}

const served = new Set(roots);
const defs = {};
const queue = [...roots];
const stubs = new Set();

function refName(typeName) {
  let sym = checker.getSymbolAtLocation(typeName);
  if (!sym) throw new Error('unresolved ' + typeName.getText());
  if (sym.flags & ts.SymbolFlags.Alias) sym = checker.getAliasedSymbol(sym);
  const d = sym.declarations && sym.declarations[0];
  if (!d) throw new Error('no decl ' + typeName.getText());
  const q = qual(d);
  if (q === null) throw new Error('outside Stripe: ' + typeName.getText());
  return q;
}

function isTopLevelResource(q) {
  // an interface whose `object` property is a string literal (`object: 'invoice'`): a resource
  const ds = decls.get(q) || [];
  return ds.some(d => ts.isInterfaceDeclaration(d) && d.members.some(m => m.name && m.name.getText() === 'object'
    && m.type && ts.isLiteralTypeNode(m.type) && ts.isStringLiteral(m.type.literal)));
}

function ref(q, expandable) {
  if (!served.has(q) && isTopLevelResource(q)) {
    stubs.add(q);
    return {$ref: '#/$defs/' + q};
  }
  if (!(q in defs) && !queue.includes(q)) queue.push(q);
  return {$ref: '#/$defs/' + q};
}

function nullable(s) {
  if (s.type && typeof s.type === 'string' && Object.keys(s).length === 1) return {type: [s.type, 'null']};
  if (s.enum) return {...s, enum: [...s.enum, null]};
  if (s.anyOf && Object.keys(s).length === 1) return {anyOf: [...s.anyOf, {type: 'null'}]};
  return {anyOf: [s, {type: 'null'}]};
}

function conv(node, expandable = false) {
  switch (node.kind) {
    case ts.SyntaxKind.StringKeyword: return {type: 'string'};
    case ts.SyntaxKind.NumberKeyword: return {type: 'number'};
    case ts.SyntaxKind.BooleanKeyword: return {type: 'boolean'};
    case ts.SyntaxKind.AnyKeyword:
    case ts.SyntaxKind.UnknownKeyword: return {};
    case ts.SyntaxKind.ParenthesizedType: return conv(node.type, expandable);
    case ts.SyntaxKind.ArrayType: return {type: 'array', items: conv(node.elementType)};
    case ts.SyntaxKind.LiteralType: {
      const l = node.literal;
      if (l.kind === ts.SyntaxKind.NullKeyword) return {type: 'null'};
      if (l.kind === ts.SyntaxKind.TrueKeyword) return {const: true};
      if (l.kind === ts.SyntaxKind.FalseKeyword) return {const: false};
      if (ts.isStringLiteral(l)) return {enum: [l.text]};
      if (ts.isNumericLiteral(l)) return {const: Number(l.text)};
      throw new Error('literal ' + node.getText());
    }
    case ts.SyntaxKind.UnionType: {
      const types = node.types;
      const hasString = types.some(t => t.kind === ts.SyntaxKind.StringKeyword);
      let isNull = false;
      const parts = [];
      for (const t of types) {
        if (t.kind === ts.SyntaxKind.LiteralType && t.literal.kind === ts.SyntaxKind.NullKeyword) { isNull = true; continue; }
        parts.push(conv(t, hasString));
      }
      let s;
      if (parts.every(p => p.enum && Object.keys(p).length === 1)) s = {enum: parts.flatMap(p => p.enum)};
      else if (parts.length === 1) s = parts[0];
      else s = {anyOf: parts};
      return isNull ? nullable(s) : s;
    }
    case ts.SyntaxKind.TypeLiteral: return objectOf(node.members);
    case ts.SyntaxKind.TypeReference: {
      const name = node.typeName.getText();
      const args = node.typeArguments || [];
      if (name === 'Array') return {type: 'array', items: conv(args[0])};
      if (name === 'ApiList') return {
        type: 'object', required: ['object', 'data', 'has_more', 'url'],
        properties: {object: {enum: ['list']}, data: {type: 'array', items: conv(args[0])},
          has_more: {type: 'boolean'}, url: {type: 'string'}},
      };
      if (name === 'Record') return {type: 'object', additionalProperties: conv(args[1])};
      return ref(refName(node.typeName), expandable);
    }
    default:
      throw new Error('kind ' + ts.SyntaxKind[node.kind] + ': ' + node.getText());
  }
}

function objectOf(members) {
  const properties = {};
  const required = [];
  let additional;
  for (const m of members) {
    if (ts.isPropertySignature(m)) {
      const name = m.name.getText().replace(/^'|'$/g, '');
      if (m.type.kind === ts.SyntaxKind.VoidKeyword) continue;  // `deleted?: void`: never present
      properties[name] = conv(m.type);
      if (!m.questionToken) required.push(name);
    } else if (ts.isIndexSignatureDeclaration(m)) {
      additional = conv(m.type);
    } else if (ts.isMethodSignature(m) || ts.isCallSignatureDeclaration(m)) {
      continue;
    } else {
      throw new Error('member ' + m.getText());
    }
  }
  const s = {type: 'object'};
  if (Object.keys(properties).length) s.properties = properties;
  if (required.length) s.required = required;
  if (additional) s.additionalProperties = additional;
  return s;
}

while (queue.length) {
  const q = queue.shift();
  if (q in defs) continue;
  const ds = decls.get(q);
  if (!ds) throw new Error('missing ' + q);
  const d = ds[0];
  if (ts.isInterfaceDeclaration(d)) {
    if (d.heritageClauses) throw new Error('extends ' + q);
    defs[q] = objectOf(ds.flatMap(x => x.members));
  } else {
    defs[q] = conv(d.type);
  }
}
for (const q of stubs) {
  if (!served.has(q) && !(q in defs)) defs[q] = {type: 'object', required: ['id', 'object'],
    properties: {id: {type: 'string'}, object: {type: 'string'}}};
}
const sorted = {};
for (const k of Object.keys(defs).sort()) sorted[k] = defs[k];
const lines = Object.entries(sorted).map(([k, v]) => '  ' + JSON.stringify(k) + ': ' + JSON.stringify(v));
const head = '{\n "$schema": "https://json-schema.org/draft/2020-12/schema",\n' +
  ' "$comment": "Stripe API 2026-01-28.clover object schemas (stripe/openapi v2160 via stripe-node 20.3.1); see NOTE",\n' +
  ' "$defs": {\n';
fs.writeFileSync(out, head + lines.join(',\n') + '\n }\n}\n');
console.log(Object.keys(sorted).length, 'defs;', stubs.size, 'stubs');
