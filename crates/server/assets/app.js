/*
 * yakuba — small page behaviours (no dependencies, works with htmx swaps).
 * Loaded with `defer`; the CSP forbids inline scripts, so everything lives here.
 */
(function () {
  'use strict';

  // 1. Confirmation dialogs: <button data-confirm="…"> / <a data-confirm="…">.
  //    Delegated on document so elements inserted by htmx are covered too.
  document.addEventListener('click', function (event) {
    var target = event.target;
    if (!(target instanceof Element)) {
      target = target && target.parentElement;
    }
    if (!target) {
      return;
    }
    var el = target.closest('button[data-confirm], a[data-confirm]');
    if (!el) {
      return;
    }
    var message = el.getAttribute('data-confirm');
    if (message && !window.confirm(message)) {
      event.preventDefault();
      event.stopImmediatePropagation();
    }
  }, true);

  // 2. Move focus to an error summary so keyboard and screen-reader users hear it.
  var focusErrors = function (root) {
    var scope = root && root.querySelector ? root : document;
    var el = scope.querySelector('#error-summary, #import-errors');
    if (!el && scope !== document && scope.matches && scope.matches('#error-summary, #import-errors')) {
      el = scope;
    }
    if (!el || !el.isConnected) {
      return;
    }
    if (!el.hasAttribute('tabindex')) {
      el.setAttribute('tabindex', '-1');
    }
    el.focus();
    if (typeof el.scrollIntoView === 'function') {
      el.scrollIntoView({ block: 'nearest' });
    }
  };

  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', function () { focusErrors(document); });
  } else {
    focusErrors(document);
  }

  // 3. Print buttons: <button data-print> (certificates).
  document.addEventListener('click', function (event) {
    var t = event.target;
    if (t instanceof Element && t.closest('button[data-print]')) {
      window.print();
    }
  });

  // 4. Content swapped in by htmx may carry its own error summary.
  document.addEventListener('htmx:afterSwap', function (event) {
    var t = event.detail && event.detail.target;
    if (t instanceof Element) {
      focusErrors(t);
    }
  });
})();
