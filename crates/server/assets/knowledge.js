// Knowledge: uploads one request per file with a progress bar each (drag and drop too),
// then follows the documents' processing until every one is ready or failed.
(function () {
  'use strict';
  var form = document.getElementById('upload-form');
  var table = document.getElementById('documents');
  var collection = (form || table || {}).getAttribute ? (form || table).getAttribute('data-collection') : null;

  function el(tag, text) {
    var e = document.createElement(tag);
    if (text) { e.textContent = text; }
    return e;
  }

  function uploadOne(file, csrf, list, done) {
    var li = el('li', file.name + ' ');
    var bar = el('progress');
    bar.max = 100; bar.value = 0;
    var note = el('span', '');
    li.appendChild(bar); li.appendChild(note);
    list.appendChild(li);
    var xhr = new XMLHttpRequest();
    xhr.open('POST', '/api/v1/knowledge/collections/' + encodeURIComponent(collection) + '/documents');
    xhr.setRequestHeader('X-CSRF-Token', csrf);
    xhr.setRequestHeader('Accept', 'application/json');
    xhr.upload.onprogress = function (e) {
      if (e.lengthComputable) { bar.value = Math.round(e.loaded * 100 / e.total); }
    };
    xhr.onload = function () {
      var msg = '';
      try {
        var body = JSON.parse(xhr.responseText);
        var r = body.results && body.results[0];
        if (r && r.ok) { msg = ' 登録しました。処理中…'; bar.value = 100; }
        else if (r) { msg = ' 登録できません: ' + r.error; li.className = 'is-error'; }
        else if (body.error) { msg = ' 登録できません: ' + body.error.message; li.className = 'is-error'; }
      } catch (err) {
        msg = xhr.status === 413 ? ' ファイルが大きすぎます。' : ' 登録できませんでした（' + xhr.status + '）。';
        li.className = 'is-error';
      }
      note.textContent = msg;
      done();
    };
    xhr.onerror = function () { note.textContent = ' 送信できませんでした。'; li.className = 'is-error'; done(); };
    var fd = new FormData();
    fd.append('file', file, file.name);
    xhr.send(fd);
  }

  function uploadAll(files) {
    var list = document.getElementById('upload-progress');
    var csrf = form.getAttribute('data-csrf');
    var left = files.length;
    if (!left) { return; }
    Array.prototype.forEach.call(files, function (f) {
      uploadOne(f, csrf, list, function () {
        left -= 1;
        if (left === 0) { window.setTimeout(function () { window.location.reload(); }, 800); }
      });
    });
  }

  if (form) {
    var input = document.getElementById('files');
    form.addEventListener('submit', function (e) {
      e.preventDefault();
      uploadAll(input.files);
    });
    var zone = document.getElementById('dropzone');
    ['dragenter', 'dragover'].forEach(function (t) {
      zone.addEventListener(t, function (e) { e.preventDefault(); zone.classList.add('is-over'); });
    });
    ['dragleave', 'drop'].forEach(function (t) {
      zone.addEventListener(t, function (e) { e.preventDefault(); zone.classList.remove('is-over'); });
    });
    zone.addEventListener('drop', function (e) { uploadAll(e.dataTransfer.files); });
  }

  // Progress of documents still being processed.
  function poll() {
    if (!table) { return; }
    var busy = table.querySelectorAll('tr[data-state="queued"], tr[data-state="processing"]');
    if (!busy.length) { return; }
    fetch('/api/v1/knowledge/collections/' + encodeURIComponent(collection) + '/documents', { headers: { Accept: 'application/json' } })
      .then(function (r) { return r.json(); })
      .then(function (body) {
        var changed = false;
        (body.documents || []).forEach(function (d) {
          var row = table.querySelector('tr[data-document="' + d.id + '"]');
          if (!row) { return; }
          var cell = row.querySelector('.doc-status');
          if (cell && cell.textContent !== d.status_label) { cell.textContent = d.status_label; }
          if (row.getAttribute('data-state') !== d.status) {
            row.setAttribute('data-state', d.status);
            changed = true;
          }
        });
        if (changed && !table.querySelector('tr[data-state="queued"], tr[data-state="processing"]')) {
          window.location.reload();
          return;
        }
        window.setTimeout(poll, 2000);
      })
      .catch(function () { window.setTimeout(poll, 5000); });
  }
  window.setTimeout(poll, 1500);
})();
