// A Fulcrum balancer in JavaScript: round robin over the eligible backends
// (up or unknown, weight above 0), with the host's turn counter shared by
// every worker (`load.next-turn`), so turns are strict across workers.
//
// Build (see README.md): npm ci && npm run build
import { log } from 'fulcrum:plugin/host@0.1.1';
import { nextTurn } from 'fulcrum:plugin/load@0.1.1';

const REJECT = { tag: 'reject' };
// One answer per eligible backend, made when the set changes: `select`
// allocates nothing but the BigInt that `nextTurn` returns.
let answers = [];

export function init(config) {
  log('info', `js round-robin: init ${config}`);
}

export function backendsChanged(backends) {
  const next = [];
  for (const b of backends) {
    if (b.weight > 0 && (b.state === 'up' || b.state === 'unknown')) {
      next.push({ tag: 'backend', val: b.id });
    }
  }
  answers = next;
}

export function select(_flow) {
  const n = answers.length;
  if (n === 0) return REJECT;
  return answers[Number(nextTurn() % BigInt(n))];
}
