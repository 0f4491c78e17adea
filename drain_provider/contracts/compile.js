#!/usr/bin/env node
// Compiles the test contracts with the pinned solc (package.json) into artifacts/*.json.
//
//   node drain_provider/contracts/compile.js          write artifacts/<Name>.json
//   node drain_provider/contracts/compile.js --check  compile in memory, compare with the
//                                                     committed artifacts (exit 1 on a difference)
//
// Paths are relative to this file, so it runs from any working directory. Source unit
// names are the bare file names, so the bytecode (and its metadata hash) does not depend
// on where the repository is checked out.
'use strict';

const fs = require('fs');
const path = require('path');

const CONTRACTS_DIR = __dirname;
const REPO_ROOT = path.resolve(CONTRACTS_DIR, '..', '..');
const ARTIFACTS_DIR = path.join(CONTRACTS_DIR, 'artifacts');

// [source file, contract name] — one artifact per contract.
const CONTRACTS = [
  ['DrainChannel.sol', 'DrainChannel'],
  ['DrainChannelV1.sol', 'DrainChannelV1'],
  ['TestUSDC.sol', 'TestUSDC'],
];

// Settings that shape the bytecode; recorded in each artifact.
const SETTINGS = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: 'cancun',
};

function fail(message) {
  process.stderr.write(`compile.js: ${message}\n`);
  process.exit(1);
}

function loadSolc() {
  try {
    return require(require.resolve('solc', { paths: [REPO_ROOT] }));
  } catch (err) {
    fail(`cannot load solc from ${path.join(REPO_ROOT, 'node_modules')} (run \`npm ci\` in the repo root): ${err.message}`);
  }
  return null;
}

function compile(solc) {
  const sources = {};
  for (const [file] of CONTRACTS) {
    if (sources[file]) continue;
    const full = path.join(CONTRACTS_DIR, file);
    let content;
    try {
      content = fs.readFileSync(full, 'utf8');
    } catch (err) {
      fail(`cannot read ${full}: ${err.message}`);
    }
    sources[file] = { content };
  }

  const input = {
    language: 'Solidity',
    sources,
    settings: {
      ...SETTINGS,
      outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object'] } },
    },
  };

  const output = JSON.parse(solc.compile(JSON.stringify(input)));
  const diagnostics = output.errors || [];
  const errors = diagnostics.filter((d) => d.severity === 'error');
  for (const d of diagnostics.filter((x) => x.severity !== 'error')) {
    process.stderr.write(d.formattedMessage || `${d.severity}: ${d.message}\n`);
  }
  if (errors.length > 0) {
    for (const d of errors) process.stderr.write(d.formattedMessage || `error: ${d.message}\n`);
    fail(`compilation failed with ${errors.length} error(s)`);
  }

  const artifacts = {};
  for (const [file, name] of CONTRACTS) {
    const unit = output.contracts && output.contracts[file] && output.contracts[file][name];
    if (!unit) fail(`no output for contract ${name} in ${file}`);
    const bytecode = unit.evm.bytecode.object;
    if (!bytecode) fail(`empty bytecode for ${name} (is it abstract?)`);
    const artifact = {
      contractName: name,
      abi: unit.abi,
      bytecode: `0x${bytecode}`,
      compiler: { version: solc.version(), settings: SETTINGS },
    };
    artifacts[`${name}.json`] = `${JSON.stringify(artifact, null, 2)}\n`;
  }
  return artifacts;
}

function main() {
  const args = process.argv.slice(2);
  const unknown = args.filter((a) => a !== '--check');
  if (unknown.length > 0) fail(`unknown argument(s): ${unknown.join(' ')} (usage: compile.js [--check])`);
  const check = args.includes('--check');

  const artifacts = compile(loadSolc());

  if (check) {
    const stale = [];
    for (const [fileName, text] of Object.entries(artifacts)) {
      const full = path.join(ARTIFACTS_DIR, fileName);
      let current = null;
      try {
        current = fs.readFileSync(full, 'utf8');
      } catch (err) {
        current = null;
      }
      if (current !== text) {
        const rel = path.relative(REPO_ROOT, full);
        stale.push(rel);
        process.stderr.write(`compile.js: ${rel} ${current === null ? 'is missing' : 'differs from the compiled contract'}\n`);
      }
    }
    if (stale.length > 0) {
      fail(`artifacts out of date: ${stale.join(', ')}; run \`node drain_provider/contracts/compile.js\``);
    }
    process.stdout.write(`artifacts up to date (${Object.keys(artifacts).join(', ')})\n`);
    return;
  }

  fs.mkdirSync(ARTIFACTS_DIR, { recursive: true });
  for (const [fileName, text] of Object.entries(artifacts)) {
    const full = path.join(ARTIFACTS_DIR, fileName);
    fs.writeFileSync(full, text);
    process.stdout.write(`wrote ${path.relative(REPO_ROOT, full)}\n`);
  }
}

main();
