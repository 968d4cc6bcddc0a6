// The training-lens report page (backward_lens.training.report): grid, loss curve, details.
(function(){
const data = JSON.parse(document.getElementById('bl-run').textContent);
const esc = s => String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
const fmt = x => (x === null || x === undefined) ? '–' : (Math.abs(x) >= 0.01 && Math.abs(x) < 1e4 ? x.toFixed(3) : x.toExponential(2));
const root = document.getElementById('bl-report');
const rows = data.rows, steps = [...new Set(rows.map(r => r.step))].sort((a,b)=>a-b);
const layers = [...new Set(rows.map(r => r.layer))].sort((a,b)=>b-a);
const matrices = [...new Set(rows.map(r => r.matrix))];
const byKey = {}; rows.forEach(r => { byKey[r.matrix+'|'+r.layer+'|'+r.step] = r; });
let html = '';
const losses = data.log.filter(l => typeof l.loss === 'number');
if (losses.length > 1) {
  const W = 640, H = 140, pad = 30, xs = losses.map(l => l.step), ys = losses.map(l => l.loss);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = s => pad + (W - 2*pad) * (s - x0) / Math.max(1, x1 - x0);
  const sy = v => H - pad + (2*pad - H) * (v - y0) / Math.max(1e-9, y1 - y0);
  const path = losses.map((l, i) => (i ? 'L' : 'M') + sx(l.step).toFixed(1) + ' ' + sy(l.loss).toFixed(1)).join(' ');
  const marks = steps.map(s => `<line x1="${sx(s)}" x2="${sx(s)}" y1="${pad/2}" y2="${H-pad}" stroke="#c88" stroke-dasharray="2,3"/>`).join('');
  html += `<h2>Training loss</h2><svg class="loss" width="${W}" height="${H}">${marks}<path d="${path}" fill="none" stroke="#246" stroke-width="1.5"/>` +
    `<text x="${pad}" y="${H-8}" font-size="11">step ${x0}</text><text x="${W-pad-50}" y="${H-8}" font-size="11">step ${x1}</text>` +
    `<text x="2" y="${sy(y1)+4}" font-size="11">${y1.toFixed(2)}</text><text x="2" y="${sy(y0)+4}" font-size="11">${y0.toFixed(2)}</text></svg>` +
    `<div class="small">dashed: steps read by the lens</div>`;
}
matrices.forEach(m => {
  const mr = rows.filter(r => r.matrix === m);
  const logs = mr.map(r => Math.log10(Math.max(r.norm, 1e-30)));
  const lo = Math.min(...logs), hi = Math.max(...logs);
  const side = mr.length ? (mr[0].reading === 'bottom' ? 'least probable tokens of the output-side direction (descent subtracts it)' : 'most probable tokens of the input-side direction') : '';
  html += `<h2>${esc(m)}</h2><div class="small">cell: words of the gradient's first singular direction, ${side}; colour: gradient norm (log scale, darker = larger); click for details</div>`;
  html += '<table class="grid"><tr><th>layer</th>' + steps.map(s => `<th>step ${s}</th>`).join('') + '</tr>';
  layers.forEach(l => {
    html += `<tr><th>${l}</th>`;
    steps.forEach(s => {
      const r = byKey[m+'|'+l+'|'+s];
      if (!r) { html += '<td></td>'; return; }
      const t = hi > lo ? (Math.log10(Math.max(r.norm, 1e-30)) - lo) / (hi - lo) : 0.5;
      const bg = `hsl(30, 90%, ${Math.round(96 - 50*t)}%)`, fg = t > 0.75 ? '#fff' : '#111';
      const words = r.directions.length ? r.directions[0].words.slice(0, 2).join(' ·') : '(zero)';
      const tip = `norm ${fmt(r.norm)}\n` + r.directions.map((d, j) => `direction ${j+1} (${(100*d.share).toFixed(0)}%): ${d.words.slice(0, 3).join(' · ')}`).join('\n');
      html += `<td class="cell" style="background:${bg};color:${fg}" data-key="${esc(m+'|'+l+'|'+s)}" title="${esc(tip)}">${esc(words)}</td>`;
    });
    html += '</tr>';
  });
  html += '</table>';
});
if (!rows.length) html += '<p>No reading yet: the lens writes a row per layer and matrix at each step it reads.</p>';
html += '<div id="detail">Click a cell to see its directions and the tokens that write them.</div>';
root.innerHTML = html;
const detail = document.getElementById('detail');
root.addEventListener('click', ev => {
  const td = ev.target.closest('td.cell'); if (!td) return;
  root.querySelectorAll('td.sel').forEach(e => e.classList.remove('sel')); td.classList.add('sel');
  const r = byKey[td.dataset.key];
  let h = `<b>${esc(r.matrix)}, layer ${r.layer}, step ${r.step}</b> <span class="small">gradient norm ${fmt(r.norm)}, ${r.n_positions} positions, read: ${r.reading} tokens of the ${r.side}put side${r.adapter ? ', LoRA-adapted' : ''}${r.trainable ? '' : ', frozen'}</span>`;
  r.directions.forEach((d, j) => {
    h += `<div class="dir"><b>direction ${j+1}</b> <span class="small">σ ${fmt(d.sigma)}, ${(100*d.share).toFixed(1)}% of the gradient</span><br>` +
      d.words.map((w, i) => `<span class="w">${esc(w)} <span class="small">${d.probs[i] !== undefined ? d.probs[i].toExponential(1) : ''}</span></span>`).join('') +
      '<br><span class="small">written by positions:</span> ' +
      d.positions.map(p => `<span class="pos">${esc(p.token)}→${esc(p.next_token)} <span class="small">(${(100*p.weight).toFixed(0)}%, batch ${p.micro} row ${p.row} col ${p.column})</span></span>`).join('; ') +
      '<br><span class="small">by input token:</span> ' + d.sources.map(s => `${esc(s.token)} <span class="small">${(100*s.weight).toFixed(0)}%</span>`).join(', ') + '</div>';
  });
  detail.innerHTML = h;
});
})();
